"""Sequential, parallel and adaptive test-time scaling at equal token cost, and what n=8 costs.

1. `s1serve eval` on held-out questions with all three methods: budget forcing (a max_think
   sweep), parallel sampling (n samples with a majority vote, n in --parallel) and adaptive
   thinking (stop when probes agree, capped at each of --adaptive). The chart plots accuracy
   against total generated tokens per question (every sample and probe counted); the JSON gives
   each method's Control / Scaling / Performance and the token savings of adaptive thinking at
   the accuracy of the full budget.
2. One request with n=8 against 8 independent requests with the same seeds (prefix caching on
   and off), on a long shared prompt: wall time, tokens computed, peak KV blocks; the engines
   alternate over --reps repetitions, min and median kept.

    python bench/scaling_methods.py --model /tmp/recipe-work2/model --eval /tmp/recipe-work2/eval.jsonl
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from results_io import RESULTS_DIR, result_path, write
from server.engine import LLM, SamplingParams
from server.engine.sampler import sample_seed

ROOT = Path(__file__).resolve().parents[1]


def equal_cost(args, out: Path) -> dict:
    flags = ["--model", args.model, "--budgets", args.budgets, "--parallel", args.parallel,
             "--parallel-max-think", str(args.parallel_max_think), "--parallel-temperature", "0.7",
             "--adaptive", args.adaptive, "--adaptive-every", str(args.adaptive_every),
             "--adaptive-agree", str(args.adaptive_agree), "--adaptive-probe-tokens", str(args.adaptive_probe_tokens),
             "--answer-tokens", "64", "--out", str(out)]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "server.cli", "eval", args.eval, *flags], check=True, cwd=ROOT)
    summary = json.loads((out / "summary.json").read_text())
    methods = summary["methods"]
    full = methods["budget_forcing"]["per_budget"][-1]  # the largest budget
    reaching = [p for p in methods["adaptive"]["per_budget"] if p["accuracy"] >= full["accuracy"]]
    cheapest = min(reaching, key=lambda p: p["mean_total_tokens"]) if reaching else None
    savings = {
        "full_budget": full["budget"], "full_budget_accuracy": full["accuracy"],
        "full_budget_total_tokens": full["mean_total_tokens"],
        "adaptive_cap": cheapest["budget"] if cheapest else None,
        "adaptive_accuracy": cheapest["accuracy"] if cheapest else None,
        "adaptive_total_tokens": cheapest["mean_total_tokens"] if cheapest else None,
        "token_savings": 1 - cheapest["mean_total_tokens"] / full["mean_total_tokens"] if cheapest else None,
    }
    scores = {m: {k: s[k] for k in ("control", "scaling_per_1k_tokens", "scaling_per_1k_total_tokens", "performance")}
              for m, s in methods.items()}
    points = {m: [{k: p[k] for k in ("budget", "accuracy", "mean_think_tokens", "mean_total_tokens")}
                  for p in s["per_budget"]] for m, s in methods.items()}
    return {"wall_s": time.perf_counter() - start, "questions": summary["num_questions"], "scores": scores,
            "points": points, "adaptive_savings": savings}


def n_versus_independent(args) -> dict:
    sentence = "The committee reviewed every proposal carefully and recorded its reasons in the minutes. "
    runs = {}
    llms = {"caching": LLM(args.model, enable_prefix_caching=True), "no_caching": LLM(args.model, enable_prefix_caching=False)}
    tokenizer = llms["caching"].tokenizer
    prompt = tokenizer(sentence * (args.prompt_tokens // len(tokenizer(sentence).input_ids)))["input_ids"]
    sampling = dict(temperature=0.7, max_tokens=args.new_tokens, ignore_eos=True)

    def one(kind: str) -> dict:
        llm = llms["no_caching" if kind == "independent_no_caching" else "caching"]
        engine, bm = llm.engine, llm.engine.block_manager
        before = engine.scheduler.num_scheduled_tokens
        start = time.perf_counter()
        if kind == "n8":
            engine.add_request(f"{kind}-{time.perf_counter_ns()}", prompt, SamplingParams(seed=1, n=8, **sampling))
        else:
            for i in range(8):
                engine.add_request(f"{kind}-{i}-{time.perf_counter_ns()}", prompt,
                                   SamplingParams(seed=sample_seed(1, i), **sampling))
        peak = 0
        while engine.has_unfinished():
            engine.step()
            peak = max(peak, bm.num_blocks - bm.num_free_blocks)
        wall = time.perf_counter() - start
        if kind != "independent_no_caching":  # the next repetition must not find this prompt cached
            bm.hash_to_block.clear()
            bm.block_hash = [None] * bm.num_blocks
        return {"wall_s": wall, "tokens_computed": engine.scheduler.num_scheduled_tokens - before, "peak_kv_blocks": peak}

    kinds = ["n8", "independent_caching", "independent_no_caching"]
    for _ in range(args.reps):
        for kind in kinds:
            runs.setdefault(kind, []).append(one(kind))
    table = {k: {"wall_s_min": min(r["wall_s"] for r in v), "wall_s_median": statistics.median(r["wall_s"] for r in v),
                 "tokens_computed": v[0]["tokens_computed"], "peak_kv_blocks": v[0]["peak_kv_blocks"]} for k, v in runs.items()}
    for k in kinds[1:]:
        table[k]["wall_ratio_to_n8"] = table[k]["wall_s_min"] / table["n8"]["wall_s_min"]
        table[k]["kv_ratio_to_n8"] = table[k]["peak_kv_blocks"] / table["n8"]["peak_kv_blocks"]
    return {"prompt_tokens": len(prompt), "new_tokens": args.new_tokens, "runs": runs, "table": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="the mini recipe's trained model (or any model directory)")
    parser.add_argument("--eval", required=True, help="held-out questions (the recipe's eval.jsonl)")
    parser.add_argument("--budgets", default="8,16,24,32,48,64")
    parser.add_argument("--parallel", default="1,2,4,8")
    parser.add_argument("--parallel-max-think", type=int, default=32)
    parser.add_argument("--adaptive", default="32,64,128")
    parser.add_argument("--adaptive-every", type=int, default=8)
    parser.add_argument("--adaptive-agree", type=int, default=2)
    parser.add_argument("--adaptive-probe-tokens", type=int, default=12)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    parser.add_argument("--skip-eval", action="store_true")
    args = parser.parse_args()

    out_path = result_path("scaling_methods", args.out_dir, "cpu-" + Path(args.model).name)
    result = {"args": vars(args)}
    result["n8_vs_independent"] = n_versus_independent(args)
    write(out_path, result)
    if not args.skip_eval:
        work = Path(args.out_dir) / "scaling_methods-work"
        result["equal_cost"] = equal_cost(args, work)
        shutil.copy(work / "accuracy_vs_total_tokens.png", out_path.with_name(out_path.stem + "-accuracy_vs_total_tokens.png"))
        shutil.rmtree(work)
    write(out_path, result)
    print(json.dumps({k: v for k, v in result.items() if k != "args"}, indent=1, default=str)[:6000])
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
