"""The whole pipeline on the shipped sample with our engine (tiny random-weight Qwen2) as solver
and teacher, and its refusals of bad input."""

import json
import shutil
from pathlib import Path

import datasets
import pytest
import yaml
from transformers import AutoTokenizer

from dataset_builder.pipeline import build, load_pipeline_config
from dataset_builder.report import S1K_COLUMNS
from dataset_builder.sample import DEFECTS, EVAL_FILE, SOURCE_FILE, generate
from server.errors import InvalidConfigError
from tests.conftest import build_tiny_model
from trainer.config import TrainConfig
from trainer.data import make_renderer

SAMPLE_CONFIG = Path(__file__).parents[2] / "dataset_builder" / "configs" / "sample.yaml"


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("db-qwen2"), "qwen2")


def sample_config(tmp_path: Path, engine_dir: Path, **changes) -> Path:
    """The shipped example config with the tiny model in place of the default one."""
    config = yaml.safe_load(SAMPLE_CONFIG.read_text())
    config["sources"][0]["path"] = str(SOURCE_FILE)
    config["eval_sets"][0]["path"] = str(EVAL_FILE)
    config["difficulty"]["solvers"] = [{"engine": str(engine_dir), "max_tokens": 16}]
    config["traces"]["teacher"] = {"engine": str(engine_dir), "min_think": 16, "max_think": 24, "max_tokens": 32}
    config["out"] = str(tmp_path / "out")
    config.update(changes)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_shipped_sample_matches_its_generator():
    rows, eval_rows = generate()
    assert [json.loads(line) for line in SOURCE_FILE.read_text().splitlines()] == rows
    assert [json.loads(line) for line in EVAL_FILE.read_text().splitlines()] == eval_rows


@pytest.fixture(scope="module")
def built(tmp_path_factory, engine_dir):
    tmp = tmp_path_factory.mktemp("build")
    config = load_pipeline_config(sample_config(tmp, engine_dir))
    return config, build(config)


def test_end_to_end_on_the_shipped_sample(built, engine_dir):
    config, result = built
    out = Path(config.out)
    data = datasets.load_from_disk(str(out / "dataset"))
    assert data.column_names == S1K_COLUMNS
    assert data.features["thinking_trajectories"] == datasets.Sequence(datasets.Value("string"))
    assert len(data) == config.select["size"]
    assert len(data) == len(datasets.Dataset.from_parquet(str(out / "s1k.parquet")))
    # One JSON line per sample (split on "\n" only: str.splitlines also splits at \x1c, \x85, ... inside traces).
    assert len((out / "s1k.jsonl").read_text().rstrip("\n").split("\n")) == len(data)
    assert (out / "funnel.png").read_bytes()[:4] == b"\x89PNG"
    funnel = json.loads((out / "funnel.json").read_text())
    stages = funnel["stages"]
    assert [s["stage"] for s in stages] == ["sources", "dedup", "decontaminate", "quality", "difficulty", "traces", "domains", "select"]
    counts = [s["count"] for s in stages]
    assert counts[0] == len(SOURCE_FILE.read_text().splitlines())
    assert counts == sorted(counts, reverse=True)
    for before, after in zip(stages, stages[1:]):
        assert sum(after["by_source"].values()) == after["count"]
        if "dropped" in after["details"]:
            assert before["count"] - after["count"] == len(after["details"]["dropped"])
    assert counts[0] - counts[1] == 8  # the 4 exact and 4 near duplicates the generator planted
    assert counts[1] - counts[2] == 3  # the 3 planted eval overlaps
    assert counts[2] - counts[3] == len(DEFECTS)
    assert sum(stages[-1]["by_domain"].values()) == len(data)
    # What the trainer renders from it: the trace sits between the s1 think markers.
    tokenizer = AutoTokenizer.from_pretrained(engine_dir)
    renderer = make_renderer(tokenizer, TrainConfig(model=str(engine_dir), dataset=str(out), output_dir="unused"), data.column_names)
    prompt_ids, completion = renderer.texts(data[0])
    assert data[0]["question"] in tokenizer.decode(prompt_ids) and completion.startswith("<|im_start|>think\n")
    assert "<|im_start|>answer\nAnswer:" in completion


def test_a_rerun_asks_no_model_again(built, tmp_path):
    config, _ = built
    cache = Path(f"{config.out}.cache")
    sizes = {p.name: p.stat().st_size for p in cache.iterdir()}
    assert set(sizes) == {"difficulty.jsonl", "traces.jsonl"}
    config.out = str(tmp_path / "again")
    config.cache_dir = str(cache)
    build(config)
    assert {p.name: p.stat().st_size for p in cache.iterdir()} == sizes  # every answer came from the cache


@pytest.mark.parametrize("case, message", [
    ("missing_source", "sample_source_nowhere.jsonl does not exist"),
    ("missing_field", "the mapping names fields ['problem_text']"),
    ("malformed_line", "bad.jsonl:3: malformed JSON line"),
])
def test_bad_input_names_the_file_and_leaves_no_output(tmp_path, engine_dir, case, message):
    source = {"path": str(SOURCE_FILE), "source_type": "s", "fields": {"question": "problem", "answer": "final_answer"}}
    if case == "missing_source":
        source["path"] = str(tmp_path / "sample_source_nowhere.jsonl")
    elif case == "missing_field":
        source["fields"]["question"] = "problem_text"
    else:
        lines = SOURCE_FILE.read_text().splitlines()[:4]
        lines[2] = lines[2][:-5]
        (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
        source["path"] = str(tmp_path / "bad.jsonl")
    config = load_pipeline_config(sample_config(tmp_path, engine_dir, sources=[source]))
    with pytest.raises(InvalidConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build(config)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out-*"))


def test_cli_builds_the_sample(tmp_path, engine_dir, capsys):
    from server.cli import main

    config = sample_config(tmp_path, engine_dir, stages=["dedup", "quality", "traces", "domains", "select"],
                           select={"size": 10, "seed": 1})
    assert main(["build-dataset", str(config), "--out", str(tmp_path / "cli-out"), "--num-proc", "2"]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "sources: 164 -> dedup: 156" in printed and "select: 10" in printed
    # The model stages show progress (tqdm on stderr) with the teacher's name and the requests done.
    assert f"traces, engine:{engine_dir}: 64/" in captured.err and "req" in captured.err
    assert len(datasets.load_from_disk(str(tmp_path / "cli-out" / "dataset"))) == 10
    shutil.rmtree(tmp_path / "cli-out")
