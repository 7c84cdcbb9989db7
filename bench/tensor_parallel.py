"""Decode step time and throughput of 1 vs 2 tensor-parallel ranks on this machine, and what
the ranks exchange per step.

The default model is a random-weight Qwen2.5-0.5B-shaped checkpoint written to a temp dir (14
heads, 2 KV heads: 2 ranks split it; SmolLM2-135M has 9 heads, which 2 does not divide). On the
CPU the ranks share the same cores, so expect no gain: the figure that carries over to GPUs is
the communication per step, reported here as bytes (the StepInputs broadcast, measured by
pickling it, and the all-reduces: 2 per layer of tokens x hidden x dtype) and as the time 2 ranks
add over 1. Engines alternate over --reps, min kept.

    python bench/tensor_parallel.py
    python bench/tensor_parallel.py --model DIR --ranks 1,3
"""

import argparse
import pickle
import tempfile
import time
from pathlib import Path

from results_io import save
from server.engine import LLM, SamplingParams
from server.models import ModelConfig


def qwen_05b_shaped(path: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from server.cli import resolve_model_dir

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(None))  # any tokenizer: ids only
    config = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=4096,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def decode_rate(llm: LLM, batch: int, prompt_tokens: int, new_tokens: int) -> dict:
    prompts = [[(7 * i + j) % 1000 + 10 for j in range(prompt_tokens)] for i in range(batch)]
    sampling = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))  # prefill cost apart
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(f"b{batch}-{i}-{time.perf_counter_ns()}", p, sampling)
    steps, start, first = 0, None, None
    while engine.has_unfinished():
        engine.step()
        steps += 1
        if steps == 1:  # the prefill step; decode steps follow
            start = time.perf_counter()
            first = steps
    elapsed = time.perf_counter() - start
    decode_steps = steps - first
    return {"ms_per_step": 1000 * elapsed / decode_steps, "tokens_per_s": batch * decode_steps / elapsed}


def step_bytes(llm: LLM, batch: int, cfg: ModelConfig, itemsize: int) -> dict:
    """One decode step of `batch` sequences: the broadcast payload and the all-reduce volume."""
    from server.engine.sequence import Sequence

    seqs = []
    for i in range(batch):
        seq = Sequence(f"x{i}", list(range(10, 10 + 512)), SamplingParams(), seed=0)
        seq.block_table = list(range(i * 33, i * 33 + 33))
        seq.num_computed_tokens = 511
        seqs.append(seq)
    step, _ = llm.engine.runner.plan(seqs, [1] * batch)
    return {"broadcast_bytes": len(pickle.dumps([step])),
            "all_reduce_bytes": 2 * cfg.num_hidden_layers * batch * cfg.hidden_size * itemsize}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model directory (default: a random Qwen2.5-0.5B-shaped checkpoint)")
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(qwen_05b_shaped(Path(tmp) / "qwen-0.5b-shaped"))
        cfg = ModelConfig.from_model_dir(model)
        ranks = [int(r) for r in args.ranks.split(",")]
        batches = [int(b) for b in args.batches.split(",")]
        llms = {r: LLM(model, tensor_parallel_size=r, num_kv_blocks=512, max_num_seqs=max(batches)) for r in ranks}
        runs: dict[str, list[dict]] = {}
        for _ in range(args.reps):
            for batch in batches:
                for r in ranks:
                    runs.setdefault(f"ranks{r}-batch{batch}", []).append(
                        decode_rate(llms[r], batch, args.prompt_tokens, args.new_tokens))
        table = {}
        for batch in batches:
            for r in ranks:
                key = f"ranks{r}-batch{batch}"
                best = min(runs[key], key=lambda x: x["ms_per_step"])
                table[key] = {**best, **step_bytes(llms[r], batch, cfg, 4)}
                if r != ranks[0]:
                    base = table[f"ranks{ranks[0]}-batch{batch}"]
                    table[key]["step_time_ratio_to_1_rank"] = best["ms_per_step"] / base["ms_per_step"]
                    table[key]["added_ms_per_step"] = best["ms_per_step"] - base["ms_per_step"]
        for llm in llms.values():
            llm.shutdown()
    result = {"model": args.model or "random Qwen2.5-0.5B-shaped (24 layers, hidden 896, 14 heads, 2 KV heads)",
              "args": vars(args), "runs": runs, "table": table}
    path = save("tensor_parallel", result)
    for key, row in table.items():
        print(f"{key}: {row['ms_per_step']:.1f} ms/step, {row['tokens_per_s']:.1f} tok/s, broadcast {row['broadcast_bytes']} B,"
              f" all-reduce {row['all_reduce_bytes']} B/step" + (f", x{row['step_time_ratio_to_1_rank']:.2f} vs 1 rank"
                                                               if "step_time_ratio_to_1_rank" in row else ""))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
