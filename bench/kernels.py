"""Decode attention on the CPU: our csrc kernel vs the pure-torch reference vs SDPA on gathered K/V.

All three read the same paged cache. The reference gathers each sequence's blocks into a padded
copy and runs masked SDPA (what the engine would do without csrc); "SDPA, pre-gathered" times
only SDPA on K/V already laid out contiguously per sequence (a lower bound for any gather-based
design, since it skips the gather). Ratios are kernel speed-ups over each baseline.

    python bench/kernels.py                         # SmolLM2-135M's attention shape
    python bench/kernels.py --num-seqs 64 --context 512 --heads 9 --kv-heads 3 --head-dim 64
"""

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from results_io import save
from server.models.paged_attention import paged_attention_decode, paged_attention_decode_reference


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-seqs", type=int, default=64)
    parser.add_argument("--context", type=int, default=512, help="max context; each sequence draws from [ctx/2, ctx]")
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    blocks_per_seq = -(-args.context // args.block_size)
    num_blocks = args.num_seqs * blocks_per_seq + 1
    shape = (num_blocks, args.block_size, args.kv_heads, args.head_dim)
    k_cache, v_cache = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    block_tables = torch.randperm(num_blocks - 1, generator=gen)[: args.num_seqs * blocks_per_seq]
    block_tables = block_tables.view(args.num_seqs, blocks_per_seq).contiguous()
    context_lens = torch.randint(args.context // 2, args.context + 1, (args.num_seqs,), generator=gen)
    query = torch.randn(args.num_seqs, args.heads, args.head_dim, generator=gen)
    scale = args.head_dim**-0.5

    gathered = [
        (
            k_cache[t].view(-1, args.kv_heads, args.head_dim)[:n].transpose(0, 1).contiguous(),
            v_cache[t].view(-1, args.kv_heads, args.head_dim)[:n].transpose(0, 1).contiguous(),
        )
        for t, n in zip(block_tables, context_lens.tolist())
    ]

    def sdpa_pregathered():
        for i, (k, v) in enumerate(gathered):
            F.scaled_dot_product_attention(query[i].unsqueeze(1), k, v, scale=scale, enable_gqa=True)

    args_ = (query, k_cache, v_cache, block_tables, context_lens, scale)
    torch.testing.assert_close(paged_attention_decode(*args_), paged_attention_decode_reference(*args_))
    timings = {
        "csrc_kernel": median_seconds(lambda: paged_attention_decode(*args_), args.repeats),
        "torch_reference": median_seconds(lambda: paged_attention_decode_reference(*args_), args.repeats),
        "sdpa_pregathered": median_seconds(sdpa_pregathered, args.repeats),
    }
    kv_bytes = 2 * int(context_lens.sum()) * args.kv_heads * args.head_dim * 4
    result = {
        "shape": vars(args) | {"total_context_tokens": int(context_lens.sum())},
        "median_seconds": timings,
        "kernel_gb_per_s": kv_bytes / timings["csrc_kernel"] / 1e9,
        "speedup_vs_reference": timings["torch_reference"] / timings["csrc_kernel"],
        "speedup_vs_sdpa_pregathered": timings["sdpa_pregathered"] / timings["csrc_kernel"],
    }
    for name, seconds in timings.items():
        print(f"{name:18s} {seconds * 1e3:9.3f} ms")
    print(f"kernel reads K/V at {result['kernel_gb_per_s']:.2f} GB/s")
    print(f"kernel speed-up: {result['speedup_vs_reference']:.2f}x vs reference, "
          f"{result['speedup_vs_sdpa_pregathered']:.2f}x vs SDPA on pre-gathered K/V")
    save("kernels", result, args.out_dir)

if __name__ == "__main__":
    main()
