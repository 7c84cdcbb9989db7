"""Short requests next to a long prompt: time to first token with and without the long-prefill cap.

One long prompt (`--long-tokens`) arrives first, then `--num-short` short ones. Without a cap
(`long_prefill_token_threshold=0`) the long prefill takes each step's whole token budget and the
short requests wait for all of it; with the cap (the default, 512) it is prefilled in chunks
beside them. Both engines run in this one invocation, ABAB, fastest of each kept; the table
gives the short requests' TTFT and the long one's, and the ratio.

    python bench/long_prefill.py                  # the embedded default model
    python bench/long_prefill.py --long-tokens 6000 --num-short 8
"""

import argparse
import statistics
import time
from pathlib import Path

from results_io import save
from server.cli import resolve_model_dir
from server.engine import LLMEngine, SamplingParams
from server.engine.config import EngineConfig


def ttfts(engine: LLMEngine, long_prompt: list[int], shorts: list[list[int]]) -> dict:
    """Seconds from submission to the first token, for the long request and each short one."""
    sampling = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    start = time.perf_counter()
    engine.add_request("long", long_prompt, sampling)
    for i, prompt in enumerate(shorts):
        engine.add_request(f"short-{i}", prompt, sampling)
    first: dict[str, float] = {}
    while engine.has_unfinished():
        for delta in engine.step():
            if delta.new_token_ids and delta.request_id not in first:
                first[delta.request_id] = time.perf_counter() - start
    short = [first[f"short-{i}"] for i in range(len(shorts))]
    return {"long_ttft_s": first["long"], "short_ttft_s": short, "short_ttft_mean_s": statistics.mean(short)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--long-tokens", type=int, default=6000)
    parser.add_argument("--num-short", type=int, default=8)
    parser.add_argument("--threshold", type=int, default=EngineConfig.long_prefill_token_threshold)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    model_dir = resolve_model_dir(args.model)
    engines = {name: LLMEngine(model_dir, EngineConfig(long_prefill_token_threshold=cap, enable_prefix_caching=False))
               for name, cap in (("no_cap", 0), ("cap", args.threshold))}
    tokenizer = engines["cap"].tokenizer
    text = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(args.long_tokens))
    long_prompt = tokenizer(text).input_ids[: args.long_tokens]
    shorts = [tokenizer(f"Question {i}: what is {i} plus {i}?").input_ids for i in range(args.num_short)]
    for engine in engines.values():  # warm-up
        ttfts(engine, long_prompt[:64], shorts[:1])
    runs: dict[str, list[dict]] = {name: [] for name in engines}
    for _ in range(args.repeats):
        for name, engine in engines.items():
            runs[name].append(ttfts(engine, long_prompt, shorts))
    best = {name: min(r, key=lambda x: x["short_ttft_mean_s"]) for name, r in runs.items()}
    summary = {
        "short_ttft_speedup": best["no_cap"]["short_ttft_mean_s"] / best["cap"]["short_ttft_mean_s"],
        "long_ttft_cost": best["cap"]["long_ttft_s"] / best["no_cap"]["long_ttft_s"],
    }
    print(f"{'engine':8s} {'short TTFT mean':>16s} {'long TTFT':>10s}")
    for name, r in best.items():
        print(f"{name:8s} {r['short_ttft_mean_s']:15.3f}s {r['long_ttft_s']:9.3f}s")
    print(f"short requests get their first token {summary['short_ttft_speedup']:.1f}x sooner with the cap "
          f"({args.threshold}); the long one {summary['long_ttft_cost']:.2f}x later")
    save("long_prefill", {"model": model_dir, "args": vars(args), "runs": runs, "best": best, "summary": summary},
         args.out_dir, f"cpu-{Path(model_dir).name.lower()}")


if __name__ == "__main__":
    main()
