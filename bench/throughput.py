"""Offline throughput: s1serve's engine vs transformers on the same weights, in one invocation.

Shaped like the public serving benchmarks (vLLM's benchmark_throughput with random data):
N requests with input and output lengths drawn uniformly, `ignore_eos` so every request produces
exactly its output length. Baselines:
  (b) transformers `generate` in static batches: each batch runs to its longest output, and only
      the requested tokens are counted (what a naive batched server delivers);
  (c) transformers' own continuous batching (`init_continuous_batching`), when installed.
Prints a table, writes raw JSON to bench/results/.

    python bench/throughput.py                     # the embedded default model
    python bench/throughput.py --model DIR --num-requests 64 --hf-batch-size 16
"""

import argparse
import random
import time
from pathlib import Path

import torch

from results_io import RESULTS_DIR, result_path, write
from server.cli import resolve_model_dir
from server.engine import LLM, SamplingParams


def make_workload(num_requests: int, lo: int, hi: int, vocab: int, seed: int):
    rng = random.Random(seed)
    requests = []
    for _ in range(num_requests):
        in_len, out_len = rng.randint(lo, hi), rng.randint(lo, hi)
        requests.append(([rng.randrange(vocab) for _ in range(in_len)], out_len))
    return requests


def run_s1serve(model_dir: str, requests, engine_args: dict) -> dict:
    llm = LLM(model_dir, **engine_args)
    llm.generate([requests[0][0]], SamplingParams(temperature=0, max_tokens=4))  # warm-up
    prompts = [p for p, _ in requests]
    sampling = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in requests]
    start = time.perf_counter()
    outputs = llm.generate(prompts, sampling)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.token_ids) for o in outputs)
    assert produced == sum(n for _, n in requests), "ignore_eos requests must produce exactly max_tokens"
    return {"seconds": elapsed, "output_tokens": produced, "preemptions": llm.engine.scheduler.num_preemptions}


def load_hf(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def run_hf_static(model, requests, batch_size: int) -> dict:
    pad = model.generation_config.pad_token_id or 0
    counted = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(requests), batch_size):
            batch = requests[i : i + batch_size]
            width = max(len(p) for p, _ in batch)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in batch])  # left padding
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
            longest = max(n for _, n in batch)
            out = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=False,
                max_new_tokens=longest, min_new_tokens=longest, pad_token_id=pad,
            )
            assert out.shape[1] - width == longest
            counted += sum(n for _, n in batch)  # only what each request asked for
    return {"seconds": time.perf_counter() - start, "output_tokens": counted, "batch_size": batch_size}


def run_hf_continuous(model, requests, timeout_s: float) -> dict | None:
    """Stops after `timeout_s`: then `seconds` is a lower bound on its time for the whole workload,
    and the reported throughput (requested tokens / seconds) an upper bound on its real one."""
    if not hasattr(model, "init_continuous_batching"):
        return None
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=max(n for _, n in requests), eos_token_id=-1)
    manager = model.init_continuous_batching(generation_config=config)
    manager.start()
    try:
        start = time.perf_counter()
        for i, (prompt, n) in enumerate(requests):
            manager.add_request(prompt, request_id=f"r{i}", max_new_tokens=n, eos_token_id=-1)
        produced, done, timed_out = 0, 0, False
        while done < len(requests):
            if time.perf_counter() - start > timeout_s:
                timed_out = True  # stopping must not wait for its batch: that took > 5 min once
                elapsed = time.perf_counter() - start
                return {"seconds": elapsed, "output_tokens": sum(n for _, n in requests), "timed_out": True,
                        "finished_requests": done, "finished_tokens": produced}
            result = manager.get_result(timeout=5)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError("transformers' continuous batching thread stopped")
                continue
            if result.is_finished():
                done += 1
                produced += len(result.generated_tokens)
        elapsed = time.perf_counter() - start
    finally:
        manager.stop(block=not timed_out)
    return {"seconds": elapsed, "output_tokens": produced}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (default: the embedded default model)")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--min-len", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hf-batch-size", type=int, default=16, help="static batch size of baseline (b)")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="s1serve's running-sequence limit")
    parser.add_argument("--skip", action="append", default=[], choices=["static", "continuous"])
    parser.add_argument("--hf-continuous-timeout", type=float, default=900.0, help="seconds before (c) is stopped")
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args()

    model_dir = resolve_model_dir(args.model)
    from server.models import ModelConfig

    vocab = ModelConfig.from_model_dir(model_dir).vocab_size
    requests = make_workload(args.num_requests, args.min_len, args.max_len, vocab, args.seed)
    results = {}
    path = result_path("throughput", args.out, f"cpu-{Path(model_dir).name.lower()}")

    def record(name: str, result: dict | None) -> None:
        if result is not None:
            result["tokens_per_s"] = result["output_tokens"] / result["seconds"]
            results[name] = result
            print(f"{name}: {result}", flush=True)
            ours = results["s1serve"]["tokens_per_s"]
            write(path, {
                "benchmark": "throughput", "model": model_dir, "workload": vars(args) | {"model": model_dir},
                "results": results,
                "ratios": {f"s1serve/{k}": ours / r["tokens_per_s"] for k, r in results.items() if k != "s1serve"},
            })

    record("s1serve", run_s1serve(model_dir, requests, {"max_num_seqs": args.max_num_seqs}))
    hf = load_hf(model_dir)
    if "static" not in args.skip:
        record("hf_static", run_hf_static(hf, requests, args.hf_batch_size))
    if "continuous" not in args.skip:
        record("hf_continuous", run_hf_continuous(hf, requests, args.hf_continuous_timeout))

    ours = results["s1serve"]["tokens_per_s"]
    print(f"{'engine':<16}{'output tok':>12}{'seconds':>10}{'tok/s':>10}{'s1serve / it':>15}")
    for name, r in results.items():
        bound = ">=" if r.get("timed_out") else ""  # a stopped baseline: its true ratio is at least this
        print(f"{name:<16}{r['output_tokens']:>12}{r['seconds']:>10.1f}{r['tokens_per_s']:>10.1f}{bound + format(ours / r['tokens_per_s'], '.2f'):>15}")

    print(f"raw results: {path}")


if __name__ == "__main__":
    main()
