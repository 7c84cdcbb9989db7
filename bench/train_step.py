"""CPU training-step cost of the s1 SFT recipe, and the projected wall time of the paper's run.

Measures `trainer.train` end to end (trl SFTTrainer, the recipe's global batch of 16, activation
checkpointing on) on a tiny random-weight Qwen2 and on the embedded SmolLM2-135M, and projects the
paper's run (Qwen2.5-32B, 1,000 samples x 5 epochs, 16 H100s) from the model's FLOPs at a stated MFU.

    python bench/train_step.py [--steps 10] [--mfu 0.4]
"""

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results_io import save  # noqa: E402

# Qwen2.5-32B(-Instruct), the s1-32B base: its config.json values.
QWEN25_32B = dict(layers=64, hidden=5120, heads=40, kv_heads=8, head_dim=128, intermediate=27648, vocab=152064)
H100_BF16_DENSE_FLOPS = 989e12  # SXM, dense (no sparsity)
PAPER = dict(samples=1000, epochs=5, seq_len=32768, gpus=16, minutes=26)


def s1k_rows(n: int, thinking_words: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        steps = " ".join(f"Step {i}: carry the {rng.choice(['tens', 'units'])} of {a} and {b}." for i in range(thinking_words // 10))
        rows.append({"question": f"What is {a}+{b}?", "thinking_trajectories": [steps], "attempt": str(a + b)})
    return rows


def tiny_model(dir: Path, tokenizer_dir: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, max_position_embeddings=4096)
    Qwen2ForCausalLM(config).save_pretrained(dir)
    tokenizer.save_pretrained(dir)
    return dir


def measure(model_dir: Path, data_dir: Path, out: Path, steps: int) -> dict:
    from trainer import TrainConfig, train

    config = TrainConfig(model=str(model_dir), dataset=str(data_dir), output_dir=str(out), learning_rate=1e-4,
                         num_epochs=1, global_batch_size=16, per_device_batch_size=4, max_seq_length=4096)
    outcome = train(config)
    m = outcome.metrics
    assert m["global_step"] == steps
    log = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    tokens = max(entry.get("num_tokens", 0) for entry in log)
    return {"steps": m["global_step"], "train_runtime_s": m["train_runtime"], "step_s": m["train_runtime"] / m["global_step"],
            "tokens": tokens, "tokens_per_s": tokens / m["train_runtime"], "first_loss": m["first_loss"], "final_loss": m["final_loss"]}


def project(mfu: float) -> dict:
    q = QWEN25_32B
    per_layer = q["hidden"] * (q["heads"] * q["head_dim"]) * 2 + q["hidden"] * (q["kv_heads"] * q["head_dim"]) * 2 \
        + 3 * q["hidden"] * q["intermediate"]
    matmul_params = q["layers"] * per_layer + q["vocab"] * q["hidden"]  # + the LM head (the embedding is a lookup)
    params = matmul_params + q["vocab"] * q["hidden"]
    # Model FLOPs per token, forward + backward: 6 per matmul weight, plus causal attention
    # (QK^T and AV over on average seq/2 positions: 2 * 2 * hidden * seq/2 forward, x3 with backward).
    attention = 6 * q["layers"] * q["hidden"] * PAPER["seq_len"]
    flops_per_token = 6 * matmul_params + attention
    tokens = PAPER["samples"] * PAPER["epochs"] * PAPER["seq_len"]
    rate = PAPER["gpus"] * H100_BF16_DENSE_FLOPS * mfu
    seconds = tokens * flops_per_token / rate
    implied_tokens_per_sample = PAPER["minutes"] * 60 * rate / flops_per_token / PAPER["samples"] / PAPER["epochs"]
    return {"model": "Qwen2.5-32B", "params": params, "flops_per_token": flops_per_token, "tokens_if_every_sample_is_32k": tokens,
            "mfu": mfu, "gpus": PAPER["gpus"], "projected_minutes_at_32k_per_sample": seconds / 60,
            "paper_minutes": PAPER["minutes"], "tokens_per_sample_the_paper_time_implies": implied_tokens_per_sample,
            "note": "model FLOPs (the recompute of activation checkpointing is not counted as useful work)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--mfu", type=float, default=0.4)
    parser.add_argument("--thinking-words", type=int, default=200)
    args = parser.parse_args()
    import datasets

    from server.models.default_model import default_model_dir

    smollm = default_model_dir()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        datasets.Dataset.from_list(s1k_rows(16 * args.steps, args.thinking_words)).save_to_disk(str(data))
        for name, model in (("tiny-qwen2", tiny_model(tmp / "tiny", smollm)), ("smollm2-135m", smollm)):
            results[name] = measure(model, data, tmp / f"out-{name}", args.steps)
            r = results[name]
            print(f"{name:>14}: {r['step_s']:.2f} s/step (16 samples), {r['tokens_per_s']:.0f} tokens/s, loss {r['first_loss']:.2f} -> {r['final_loss']:.2f}")
    results["projection"] = p = project(args.mfu)
    print(f"paper run on {p['gpus']} H100 at {p['mfu']:.0%} MFU, every sample 32k tokens: {p['projected_minutes_at_32k_per_sample']:.0f} min"
          f" (paper: {p['paper_minutes']} min, which at this MFU means ~{p['tokens_per_sample_the_paper_time_implies']:.0f} tokens per sample)")
    print(f"wrote {save('train_step', results)}")


if __name__ == "__main__":
    main()
