"""Load on the network server vs the same workload offline, in one invocation.

N concurrent streaming gRPC clients send a fixed number of greedy requests to a server (started
in this process on free ports, or `--server ADDR` for a running one); then the same requests run
through `LLM.generate` offline on the same weights. Reports requests/s, output tokens/s, TTFT and
inter-token latency percentiles, and the serving overhead (offline tokens/s over served tokens/s).

    python bench/serve_load.py                          # the embedded default model
    python bench/serve_load.py --concurrency 32 --num-requests 128 --max-tokens 128
"""

import argparse
import asyncio
import random
import time
from pathlib import Path

from clients import AsyncS1Client
from clients.eval.metrics import percentile
from results_io import save
from server.api.serve import BackgroundServer
from server.cli import resolve_model_dir
from server.engine import LLM, SamplingParams

WORDS = "the of and to in is that for it as with was on be by at this are from or an which one".split()


def workload(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 200))) for _ in range(n)]


async def load(address: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    ttft, itl, tokens = [], [], 0
    queue = list(enumerate(prompts))

    async def worker(client: AsyncS1Client) -> None:
        nonlocal tokens
        while queue:
            _, prompt = queue.pop()
            start = last = time.perf_counter()
            first = True
            async for chunk in client.stream(prompt, max_tokens=max_tokens, temperature=0, budget=False):
                if not chunk.token_ids:
                    continue
                now = time.perf_counter()
                (ttft if first else itl).append(now - (start if first else last))
                first, last = False, now
                tokens += len(chunk.token_ids)

    async with AsyncS1Client(address) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return {
        "seconds": seconds, "output_tokens": tokens, "requests_per_s": len(prompts) / seconds,
        "tokens_per_s": tokens / seconds,
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--server", help="gRPC address of a running server (default: start one here)")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    model_dir = resolve_model_dir(args.model)
    prompts = workload(args.num_requests, args.seed)
    if args.server:
        served = asyncio.run(load(args.server, prompts, args.concurrency, args.max_tokens))
    else:
        with BackgroundServer(model_dir) as server:
            served = asyncio.run(load(server.grpc_address, prompts, args.concurrency, args.max_tokens))
    print(f"served:  {served['seconds']:.1f} s, {served['tokens_per_s']:.1f} tok/s", flush=True)

    llm = LLM(model_dir, max_num_seqs=args.concurrency)  # the same concurrency, no network
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=2))
    start = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=args.max_tokens))
    seconds = time.perf_counter() - start
    offline = {"seconds": seconds, "output_tokens": sum(len(o.token_ids) for o in outs),
               "tokens_per_s": sum(len(o.token_ids) for o in outs) / seconds}
    print(f"offline: {offline['seconds']:.1f} s, {offline['tokens_per_s']:.1f} tok/s")
    overhead = offline["tokens_per_s"] / served["tokens_per_s"]
    print(f"requests/s {served['requests_per_s']:.2f}; TTFT p50 {served['ttft_p50_s'] * 1e3:.0f} ms, "
          f"p99 {served['ttft_p99_s'] * 1e3:.0f} ms; ITL p50 {served['itl_p50_s'] * 1e3:.0f} ms, "
          f"p99 {served['itl_p99_s'] * 1e3:.0f} ms; serving overhead {overhead:.2f}x")
    result = {
        "model": model_dir, "args": vars(args), "served": served, "offline": offline,
        "serving_overhead_ratio": overhead,
    }
    save("serve_load", result, args.out_dir, f"cpu-{Path(model_dir).name.lower()}")

if __name__ == "__main__":
    main()
