"""reasoning-gym as a source, the template-aware decontamination, and the procedural teacher."""

import json
import random

import pytest
import reasoning_gym

from dataset_builder.backends import make_backend
from dataset_builder.dedup import Decontaminate, EvalSet
from dataset_builder.procedural_teacher import ParseError, solve, trace
from dataset_builder.reasoning_gym_source import rows
from dataset_builder.sources import COLUMNS, SourceSpec, load_sources
from server.errors import InvalidConfigError

CHAIN = {"min_terms": 3, "max_terms": 5, "min_digits": 1, "max_digits": 2}
BASIC = {"min_terms": 3, "max_terms": 4, "min_digits": 1, "max_digits": 2, "operators": ["+", "-"]}


def test_generated_sources_are_seeded_and_in_the_pipeline_schema():
    first, again, other = (rows("chain_sum", 20, seed, CHAIN) for seed in (1, 1, 2))
    assert first == again and [r["question"] for r in first] != [r["question"] for r in other]
    data = load_sources([SourceSpec(reasoning_gym="chain_sum", size=20, seed=1, task_config=CHAIN),
                         SourceSpec(reasoning_gym="basic_arithmetic", size=10, seed=2, task_config=BASIC)])
    assert data.column_names == list(COLUMNS) and len(data) == 30
    meta = json.loads(data[25]["metadata"])
    assert data[25]["source_type"] == "reasoning_gym/basic_arithmetic" and meta["task"] == "basic_arithmetic"
    assert data[0]["answer"] == first[0]["answer"]
    with pytest.raises(InvalidConfigError, match="either a path or a reasoning_gym"):
        SourceSpec(path="x.jsonl", reasoning_gym="chain_sum", size=3)
    with pytest.raises(InvalidConfigError, match="chain_sum"):
        load_sources([SourceSpec(reasoning_gym="chain_sum", size=3, task_config={"no_such_option": 1})])


def test_decontamination_ignores_the_generators_wording_but_catches_a_real_overlap(tmp_path):
    import datasets

    evals = rows("chain_sum", 50, 1001, CHAIN)
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    train = [r["question"] for r in rows("chain_sum", 60, 1, CHAIN)]
    leaked = evals[7]["question"]
    data = datasets.Dataset.from_dict({"question": train + [leaked]})
    plain = Decontaminate([EvalSet(str(tmp_path / "eval.jsonl"))], n=8)(data)
    assert len(plain) < len(train) / 2  # the shared wording alone makes almost everything "contaminated"
    stage = Decontaminate([EvalSet(str(tmp_path / "eval.jsonl"))], n=8, template_share=0.2)
    kept = stage(data)
    assert leaked not in kept["question"]
    exact_repeats = sum(q in {e["question"] for e in evals} for q in train)
    assert len(stage.dropped) <= 1 + exact_repeats + 2  # the leak, true repeats, at most a rare sign-only twin


@pytest.mark.parametrize("task,config", [("chain_sum", CHAIN), ("basic_arithmetic", BASIC)])
def test_procedural_traces_reach_the_answer_the_tasks_scorer_accepts(task, config):
    dataset = reasoning_gym.create_dataset(task, size=200, seed=7, **config)
    rng = random.Random(0)
    slipped = 0
    for entry in dataset:
        thinking, attempt = trace(entry["question"], rng, slip_rate=0.3)
        assert dataset.score_answer(answer=attempt, entry=entry) == 1.0, entry["question"]
        assert thinking.endswith(f"So the answer is {attempt}.")
        steps = [line for line in thinking.splitlines() if " = " in line and not line.startswith(("Wait", "Check"))]
        assert len(steps) >= 2  # several intermediate results, not a one-line answer
        slipped += "\nWait, that is wrong:" in thinking
    assert 0.2 < slipped / len(dataset) < 0.4


def test_the_procedural_teacher_is_a_backend_and_reports_what_it_cannot_solve():
    teacher = make_backend({"procedural": "arithmetic", "slip_rate": 0.0})
    good, bad = teacher.chat([[{"role": "user", "content": "Calculate ( 2 + -7 ) - 4."}],
                              [{"role": "user", "content": "Name a prime."}]])
    assert good.content == "-9" and good.reasoning.splitlines()[1:3] == ["2 + -7 = -5.", "-5 - 4 = -9."]
    assert bad.error.startswith("procedural teacher:") and not bad.reasoning
    assert solve("Calculate 6 * 7 - 8 / 2.") == (38, [(6, "*", 7, 42), (8, "/", 2, 4), (42, "-", 4, 38)])
    with pytest.raises(ParseError):
        solve("Calculate 7 / 2.")
    with pytest.raises(InvalidConfigError):
        make_backend({"procedural": "poetry"})
