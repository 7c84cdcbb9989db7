"""The s1 SFT recipe on trl, on a tiny random-weight Qwen2: the label mask on the collated batch,
a short run that learns, the saved directory served by our engine, the schedule, and bad input."""

import json
import math
import shutil

import pytest
from transformers import AutoTokenizer, TrainerState

from server.engine import LLM, SamplingParams
from server.engine.think import THINK_TEMPLATES
from server.errors import InvalidConfigError
from tests.conftest import hf_greedy
from trainer import TrainConfig, train
from trainer.train import LOSS_LOG_FILE, RESULTS_FILE, STATE_FILE, build_trainer

from .conftest import S1K_COLUMNS, s1k_rows, write_s1k


def config(base_model, dataset, out, **overrides) -> TrainConfig:
    fields = dict(model=str(base_model), dataset=str(dataset), output_dir=str(out), max_seq_length=512)
    return TrainConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def r1_model(base_model, tmp_path_factory):
    """The tiny model with `<think>` / `</think>` added as special tokens (its embedding has spare rows)."""
    path = tmp_path_factory.mktemp("base-r1")
    shutil.copytree(base_model, path, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("think_format", ["s1", "r1"])
def test_collated_labels_cover_the_assistant_turn_and_nothing_else(base_model, r1_model, s1k_dir, tmp_path, think_format):
    model = base_model if think_format == "s1" else r1_model
    trainer, _ = build_trainer(config(model, s1k_dir, tmp_path / "out", think_format=think_format, per_device_batch_size=4))
    tokenizer = trainer.processing_class
    rows = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator(rows)
    source = {row["question"]: row for row in s1k_rows(32)}
    template = THINK_TEMPLATES[think_format]
    for ids, labels, mask in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), batch["attention_mask"].tolist()):
        n = sum(mask)
        ids, labels = ids[:n], labels[:n]
        first_trained = next(i for i, label in enumerate(labels) if label != -100)
        # Every token after the first trained one is trained (no hole), and labels equal the inputs.
        assert all(label == tok for label, tok in zip(labels[first_trained:], ids[first_trained:]))
        prompt = tokenizer.decode(ids[:first_trained])
        completion = tokenizer.decode(ids[first_trained:])
        question = prompt.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
        sample = source[question]
        assert prompt.endswith("<|im_start|>assistant\n") and prompt.startswith("<|im_start|>user\n")
        thinking, attempt = sample["thinking_trajectories"][0], sample["attempt"]
        if think_format == "s1":
            assert completion == f"<|im_start|>think\n{thinking}\n<|im_start|>answer\nAnswer: {attempt}<|im_end|>"
        else:
            assert completion == f"<think>\n{thinking}\n</think>\n\nFinal Answer: {attempt}<|im_end|>"
        assert completion == template.reply(thinking, attempt) + "<|im_end|>"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_system_prompt_is_rendered_and_never_trained(base_model, s1k_dir, tmp_path):
    trainer, _ = build_trainer(config(base_model, s1k_dir, tmp_path / "out", system_prompt="You are Qwen."))
    row = trainer.train_dataset[0]
    prompt_ids = [t for t, label in zip(row["input_ids"], row["labels"]) if label == -100]
    assert trainer.processing_class.decode(prompt_ids).startswith("<|im_start|>system\nYou are Qwen.<|im_end|>\n")


@pytest.fixture(scope="module")
def trained(base_model, s1k_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "model"
    cfg = config(base_model, s1k_dir, out, learning_rate=3e-3, num_epochs=4, global_batch_size=4, per_device_batch_size=2)
    return cfg, train(cfg)


def test_a_short_run_lowers_the_loss_clearly(trained):
    _, outcome = trained
    losses = [json.loads(line)["loss"] for line in (outcome.output_dir / LOSS_LOG_FILE).read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 32
    assert sum(losses[-4:]) / 4 < 0.3 * sum(losses[:4]) / 4, losses
    results = json.loads((outcome.output_dir / RESULTS_FILE).read_text())
    assert results["metrics"]["final_loss"] == losses[-1]
    assert results["hyperparameters"]["learning_rate"] == 3e-3


def test_the_saved_directory_serves_in_our_engine_greedy_equal_to_transformers(trained, make_llm):
    _, outcome = trained
    out = outcome.output_dir
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin.index.json"))
    llm = make_llm(out, num_kv_blocks=64, block_size=16)
    assert llm.engine.think_template.name == "s1"
    prompt_ids = [llm.engine.render_chat([{"role": "user", "content": q}]) for q in ("What is 3+4?", "What is 9+9?")]
    ours = llm.generate(prompt_ids, SamplingParams(max_tokens=40, temperature=0.0))
    assert [o.token_ids for o in ours] == hf_greedy(out, prompt_ids, 40)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and tokenizer.convert_tokens_to_ids("<|im_end|>") in llm.engine.eos_token_ids


def test_effective_batch_and_lr_schedule_match_the_config(trained, s1k_dir):
    cfg, outcome = trained
    state = TrainerState.load_from_json(str(outcome.output_dir / STATE_FILE))
    steps_per_epoch = 32 // cfg.global_batch_size
    assert state.max_steps == state.global_step == steps_per_epoch * cfg.num_epochs
    assert outcome.hyperparameters["effective_batch_size"] == cfg.global_batch_size
    assert outcome.hyperparameters["gradient_accumulation_steps"] == cfg.global_batch_size // cfg.per_device_batch_size
    # One epoch of optimizer steps consumed every token of every sample exactly once.
    logs = [entry for entry in state.log_history if "loss" in entry]
    total_tokens = sum(len(ids) for ids in build_trainer(cfg)[0].train_dataset["input_ids"])
    assert logs[steps_per_epoch - 1]["num_tokens"] == total_tokens
    # Linear warm-up over ceil(5% of the steps), then cosine to 0; step t logs the rate it used.
    total, warmup = state.max_steps, math.ceil(cfg.warmup_ratio * state.max_steps)

    def lr(s: int) -> float:
        if s < warmup:
            return cfg.learning_rate * s / warmup
        return cfg.learning_rate * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))

    assert [entry["learning_rate"] for entry in logs] == pytest.approx([lr(e["step"] - 1) for e in logs], rel=1e-6, abs=1e-12)


def test_the_paper_recipe_is_the_default():
    cfg = TrainConfig(model="m", dataset="d", output_dir="o")
    assert (cfg.learning_rate, cfg.num_epochs, cfg.global_batch_size, cfg.warmup_ratio) == (1e-5, 5, 16, 0.05)
    assert (cfg.weight_decay, cfg.adam_beta1, cfg.adam_beta2, cfg.max_seq_length) == (1e-4, 0.9, 0.95, 32768)
    assert cfg.gradient_checkpointing and cfg.think_format == "s1"
    assert cfg.gradient_accumulation(world_size=16) == 1 and cfg.gradient_accumulation(world_size=8) == 2


def test_overlong_samples_are_truncated_or_dropped_by_flag(base_model, tmp_path):
    rows = s1k_rows(6)
    rows[0]["thinking_trajectories"] = ["Let me add. " * 200]
    data = write_s1k(tmp_path / "data", rows)
    for policy, expected_rows in (("truncate", 6), ("drop", 5)):
        trainer, report = build_trainer(config(base_model, data, tmp_path / policy, max_seq_length=128, overlong=policy))
        assert report.count == 1 and report.longest > 128
        assert len(trainer.train_dataset) == expected_rows
        assert max(len(ids) for ids in trainer.train_dataset["input_ids"]) <= 128


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_column", "needs the columns"),
        ("empty", "has no rows"),
        ("r1_without_tokens", "think_format"),
        ("missing_path", "does not exist"),
        ("batch_arithmetic", "global_batch_size"),
        ("malformed_jsonl", r"data.jsonl:2: malformed JSON line"),
    ],
)
def test_bad_input_fails_before_training_with_a_clear_error(base_model, tmp_path, case, message):
    rows = s1k_rows(4)
    dataset, overrides = tmp_path / "data", {}
    if case == "missing_column":
        write_s1k(dataset, [{k: v for k, v in r.items() if k != "attempt"} for r in rows])
    elif case == "empty":
        import datasets

        dataset = tmp_path / "empty.parquet"
        datasets.Dataset.from_dict({c: [] for c in S1K_COLUMNS}).to_parquet(str(dataset))
    elif case == "r1_without_tokens":
        write_s1k(dataset, rows)
        overrides["think_format"] = "r1"
    elif case == "missing_path":
        dataset = tmp_path / "nowhere.parquet"
    elif case == "batch_arithmetic":
        write_s1k(dataset, rows)
        overrides.update(global_batch_size=6, per_device_batch_size=4)
    elif case == "malformed_jsonl":
        dataset = tmp_path / "data.jsonl"
        dataset.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(InvalidConfigError, match=message):
        build_trainer(config(base_model, dataset, tmp_path / "out", **overrides))
    assert not (tmp_path / "out").exists()


def test_cli_reads_the_config_file_and_flags_override_it(base_model, s1k_dir, tmp_path, capsys):
    from server.cli import main

    out = tmp_path / "out"
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(f"model: {base_model}\ndataset: {s1k_dir}\noutput_dir: {out}\nnum_epochs: 3\nmax_seq_length: 512\n")
    assert main(["train", str(cfg_file), "--num-epochs", "1", "--learning-rate", "1e-4"]) == 0
    hyper = json.loads((out / RESULTS_FILE).read_text())["hyperparameters"]
    assert (hyper["num_epochs"], hyper["learning_rate"], hyper["max_steps"]) == (1, 1e-4, 2)
    assert "trained 2 steps" in capsys.readouterr().out
    cfg_file.write_text(f"model: {base_model}\ndataset: {s1k_dir}\noutput_dir: {out}\nepochs: 3\n")
    assert main(["train", str(cfg_file)]) == 2
    assert "unknown fields ['epochs']" in capsys.readouterr().err


def test_s1k_1_1_schema_trains_on_the_deepseek_traces(base_model, tmp_path):
    import datasets

    rows = [{"question": r["question"], "solution": r["solution"], "gemini_thinking_trajectory": "gemini thinks",
             "gemini_attempt": "gemini", "deepseek_thinking_trajectory": r["thinking_trajectories"][0],
             "deepseek_attempt": r["attempt"]} for r in s1k_rows(4)]
    path = tmp_path / "s1K-1.1.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    trainer, _ = build_trainer(config(base_model, path, tmp_path / "out"))
    row = trainer.train_dataset[0]
    completion = trainer.processing_class.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != -100])
    assert completion.startswith(f"<|im_start|>think\n{rows[0]['deepseek_thinking_trajectory']}\n<|im_start|>answer")
    assert "gemini" not in completion
