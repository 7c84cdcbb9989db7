"""Budget forcing in the engine vs the s1 repository's loop on the same engine, in one invocation.

    (a) in-engine: one request per question with ThinkBudget(min_think, max_waits=4); Waits are
        appended inside the decode loop.
    (b) the s1 loop: generate until the end-of-thinking delimiter, then re-submit prompt + output
        + "Wait" as a new request, 4 times, then the answer (what simplescaling/s1's README does),
        with prefix caching off and on. All questions advance through the rounds together.
With min_think close to max_tokens the model tries to stop thinking (SmolLM2 by EOS, which counts
as an attempt, as in the s1 script) and gets up to 4 Waits; `--bias` adds a logit bias on the
delimiter's first token, for models that rarely try. Budget overhead: the same requests without a budget
vs with `max_think` only (set so it triggers once, at the end; the delimiter suppressed in both),
exactly the same tokens computed, in ABBA order. Every run is repeated (`--repeats`, the order
rotated each round, since on these machines the order alone moves a run by 10%) and the fastest
and the median of each are reported. Prints a table, writes raw JSON to bench/results/.

    python bench/budget.py                      # the embedded default model
    python bench/budget.py --model DIR --num-requests 32 --max-tokens 200
    python bench/budget.py --dtype float32     # exact mode: the loop's tokens equal the engine's
"""

import argparse
import time
from statistics import median
from pathlib import Path

from results_io import save
from server.cli import resolve_model_dir
from server.engine import LLM, SamplingParams, ThinkBudget

WAITS = 4


def questions(n: int) -> list[str]:
    return [f"What is {17 + 3 * i} times {23 + 7 * i}? Think step by step." for i in range(n)]


def in_engine(llm: LLM, prompts: list[list[int]], max_tokens: int, bias: dict, min_think: int) -> dict:
    sampling = SamplingParams(temperature=0, max_tokens=max_tokens, logit_bias=bias)
    budget = ThinkBudget(min_think=min_think, max_waits=WAITS)
    start = time.perf_counter()
    outs = llm.generate(prompts, sampling, budget)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "output_tokens": sum(len(o.token_ids) for o in outs),
        "waits": [o.num_waits for o in outs],
        "token_ids": [o.token_ids for o in outs],
    }


def s1_loop(llm: LLM, prompts: list[list[int]], max_tokens: int, bias: dict, min_think: int) -> dict:
    """simplescaling/s1's budget forcing at the token level, every round re-submitted to `llm`."""
    engine = llm.engine
    think = engine.think_ids
    eos = sorted(engine.eos_token_ids)
    forced_end = list(think.think_end + think.answer_prefix)
    # As the engine does: thinking is cut where the forced end and the minimum answer still fit.
    limit = max_tokens - len(forced_end) - engine.config.min_answer_tokens
    # The prompts a budgeted request starts from: the engine appends the think opener to them.
    prompts = [engine._tokenize(p, budgeted=True)[0] for p in prompts]
    outs = [[] for _ in prompts]
    waits = [0] * len(prompts)
    thinking = list(range(len(prompts)))
    start = time.perf_counter()
    while thinking:  # one round: every request still thinking generates to its delimiter
        params = [
            SamplingParams(temperature=0, max_tokens=limit - len(outs[i]), logit_bias=bias,
                           stop_token_ids=(think.think_end[0], *eos))
            for i in thinking
        ]
        results = llm.generate([prompts[i] + outs[i] for i in thinking], params)
        still = []
        for i, res in zip(thinking, results):
            tokens = res.token_ids
            stopped = res.finish_reason == "stop"
            outs[i] += tokens[:-1] if stopped else tokens
            if not stopped:  # the think limit: force the end
                outs[i] += forced_end
            elif len(outs[i]) < min_think and waits[i] < WAITS:
                outs[i] += list(think.wait)[: limit - len(outs[i])]
                waits[i] += 1
                if len(outs[i]) < limit:
                    still.append(i)
                else:
                    outs[i] += forced_end
            elif tokens[-1] == think.think_end[0]:  # the model wrote the delimiter: complete it as written
                outs[i] += list(think.think_end)
            else:  # EOS while thinking: the forced end (delimiter + answer prefix), as the engine does
                outs[i] += forced_end
        thinking = still
    answering = [i for i in range(len(prompts)) if len(outs[i]) < max_tokens]
    if answering:  # the answer phase: one more request each
        params = [SamplingParams(temperature=0, max_tokens=max_tokens - len(outs[i]), logit_bias=bias) for i in answering]
        for i, res in zip(answering, llm.generate([prompts[i] + outs[i] for i in answering], params)):
            outs[i] += res.token_ids
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "output_tokens": sum(map(len, outs)), "waits": waits, "token_ids": outs}


def timing(seconds: list[float]) -> dict:
    """A repeated run's fastest, median and every time."""
    return {"seconds": min(seconds), "median_seconds": median(seconds), "all_seconds": seconds}


def overhead(llm: LLM, prompts: list[list[int]], max_tokens: int, delimiter: int, repeats: int) -> dict:
    """The same number of tokens with and without a budget (max_think where the answer's minimum
    room begins, so it triggers once, at the end), run in ABBA order `repeats` times."""
    think = llm.engine.think_ids
    sampling = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logit_bias={delimiter: -100.0})
    max_think = max_tokens - len(think.think_end + think.answer_prefix) - llm.engine.config.min_answer_tokens
    cases = {"no_budget": None, "max_think_only": ThinkBudget(max_think=max_think)}
    times: dict[str, list[float]] = {name: [] for name in cases}
    tokens = {}
    for i in range(repeats):
        for name in (list(cases) if i % 2 == 0 else list(reversed(cases))):
            start = time.perf_counter()
            outs = llm.generate(prompts, sampling, cases[name])
            times[name].append(time.perf_counter() - start)
            tokens[name] = sum(len(o.token_ids) for o in outs)
    return {name: {**timing(times[name]), "output_tokens": tokens[name]} for name in cases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--min-think", type=int, default=150, help="high enough that all 4 Waits are needed")
    parser.add_argument("--bias", type=float, default=0.0, help="logit bias on the delimiter's first token")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (a) and (b), the order rotated each round")
    parser.add_argument("--overhead-repeats", type=int, default=6, help="runs of each overhead case, in ABBA order")
    parser.add_argument("--dtype", default="auto", help="the engine's dtype (auto: bf16 on CPUs with native bf16)")
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    model_dir = resolve_model_dir(args.model)
    runs, llms = {}, {}
    for caching in (False, True):
        llms[caching] = LLM(model_dir, enable_prefix_caching=caching, dtype=args.dtype)
    engine = llms[False].engine
    prompts = [engine.render_chat([{"role": "user", "content": q}]) for q in questions(args.num_requests)]
    bias = {engine.think_ids.think_end[0]: args.bias} if args.bias else {}
    for llm in llms.values():
        llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=4))  # warm-up

    cases = {
        "a_in_engine": lambda: in_engine(llms[False], prompts, args.max_tokens, bias, args.min_think),
        "b_s1_loop_no_prefix_cache": lambda: s1_loop(llms[False], prompts, args.max_tokens, bias, args.min_think),
        "b_s1_loop_prefix_cache": lambda: s1_loop(llms[True], prompts, args.max_tokens, bias, args.min_think),
    }
    names, times = list(cases), {name: [] for name in cases}
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            runs[name] = cases[name]()  # greedy: every round computes the same tokens; the last is kept
            times[name].append(runs[name]["seconds"])
            print(f"round {r + 1}: {name:28s} {runs[name]['seconds']:6.1f} s", flush=True)
    for name, run in runs.items():
        run.update(timing(times[name]))
    cost = overhead(llms[False], prompts, args.max_tokens, engine.think_ids.think_end[0], args.overhead_repeats)

    a = runs["a_in_engine"]
    a_tokens = a["token_ids"]
    for run in runs.values():
        run["tokens_per_s"] = run["output_tokens"] / run["seconds"]
        run["same_tokens_as_a"] = sum(x == y for x, y in zip(run.pop("token_ids"), a_tokens))
    b, b_cached, no_budget, budget = (runs["b_s1_loop_no_prefix_cache"], runs["b_s1_loop_prefix_cache"],
                                      cost["no_budget"], cost["max_think_only"])
    summary = {  # ratios of the fastest runs and of the medians
        "a_vs_b_no_prefix_cache": b["seconds"] / a["seconds"],
        "a_vs_b_no_prefix_cache_median": b["median_seconds"] / a["median_seconds"],
        "a_vs_b_prefix_cache": b_cached["seconds"] / a["seconds"],
        "a_vs_b_prefix_cache_median": b_cached["median_seconds"] / a["median_seconds"],
        "budget_overhead": budget["seconds"] / no_budget["seconds"] - 1,
        "budget_overhead_median": budget["median_seconds"] / no_budget["median_seconds"] - 1,
        "targets": {"a_vs_b_no_prefix_cache": ">= 3.0", "budget_overhead": "<= 0.02"},  # issue 18
    }
    result = {
        "model": model_dir,
        "args": vars(args),
        "runs": runs,
        "overhead_runs": cost,
        "summary": summary,
    }
    print(f"{'run':28s} {'fastest':>8s} {'median':>8s} {'tokens':>7s} {'tok/s':>7s} {'waits':>6s} {'same as (a)':>11s}")
    for name, run in runs.items():
        print(f"{name:28s} {run['seconds']:8.1f} {run['median_seconds']:8.1f} {run['output_tokens']:7d} "
              f"{run['tokens_per_s']:7.1f} {sum(run['waits']):6d} {run['same_tokens_as_a']:>8d}/{args.num_requests}")
    for name, run in cost.items():
        print(f"{name:28s} {run['seconds']:8.1f} {run['median_seconds']:8.1f} {run['output_tokens']:7d}")
    print(f"(a) is {summary['a_vs_b_no_prefix_cache']:.2f}x faster than (b) without prefix caching "
          f"(medians {summary['a_vs_b_no_prefix_cache_median']:.2f}x; {summary['a_vs_b_prefix_cache']:.2f}x with caching); "
          f"budget overhead {100 * summary['budget_overhead']:+.1f}% (fastest runs; medians "
          f"{100 * summary['budget_overhead_median']:+.1f}%)")
    save("budget", result, args.out_dir, f"cpu-{Path(model_dir).name.lower()}")

if __name__ == "__main__":
    main()
