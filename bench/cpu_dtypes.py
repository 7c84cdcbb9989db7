"""The engine in fp32 against bf16 on this CPU: one stream's ms per token, and the throughput
workload of bench/throughput.py (64 requests, lengths U[16, 512], EOS ignored, greedy). Both
engines are loaded once and alternate over --reps; the fastest run of each is kept.

    python bench/cpu_dtypes.py
"""

import argparse
import random
import time

from results_io import save
from server.cli import resolve_model_dir
from server.engine import LLM, SamplingParams


def one_stream(llm: LLM, new_tokens: int) -> float:
    start = time.perf_counter()
    llm.generate("Tell me a story about a ship.", SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
    return 1000 * (time.perf_counter() - start) / new_tokens


def workload(llm: LLM, num_requests: int, seed: int) -> dict:
    rng = random.Random(seed)
    vocab = len(llm.tokenizer)
    prompts = [[rng.randrange(100, vocab) for _ in range(rng.randint(16, 512))] for _ in range(num_requests)]
    samplings = [SamplingParams(temperature=0, max_tokens=rng.randint(16, 512), ignore_eos=True) for _ in prompts]
    start = time.perf_counter()
    outs = llm.generate(prompts, samplings)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs)
    return {"seconds": elapsed, "output_tokens": tokens, "tokens_per_s": tokens / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model directory (default: the embedded default model)")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128, help="one stream's tokens")
    args = parser.parse_args()
    model = resolve_model_dir(args.model)
    llms = {dtype: LLM(model, dtype=dtype, max_num_seqs=64) for dtype in ("float32", "bfloat16")}
    runs: dict[str, dict[str, list]] = {d: {"ms_per_token": [], "workload": []} for d in llms}
    for _ in range(args.reps):
        for dtype, llm in llms.items():
            runs[dtype]["ms_per_token"].append(one_stream(llm, args.new_tokens))
            runs[dtype]["workload"].append(workload(llm, args.num_requests, seed=0))
    table = {d: {"linear_backend": llms[d].engine.runner.linear_backend,
                 "ms_per_token": min(r["ms_per_token"]),
                 "tokens_per_s": max(w["tokens_per_s"] for w in r["workload"])} for d, r in runs.items()}
    table["bfloat16"]["speedup_one_stream"] = table["float32"]["ms_per_token"] / table["bfloat16"]["ms_per_token"]
    table["bfloat16"]["speedup_throughput"] = table["bfloat16"]["tokens_per_s"] / table["float32"]["tokens_per_s"]
    path = save("cpu_dtypes", {"model": model, "args": vars(args), "runs": runs, "table": table})
    for dtype, row in table.items():
        print(dtype, row)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
