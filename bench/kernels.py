"""CPU attention kernels against their baselines, one invocation, ratios in one JSON.

Decode: our csrc kernel vs the pure-torch reference vs SDPA on gathered K/V. All three read the
same paged cache. The reference gathers each sequence's blocks into a padded copy and runs masked
SDPA (what the engine would do without csrc); "SDPA, pre-gathered" times only SDPA on K/V already
laid out contiguously per sequence (a lower bound for any gather-based design, since it skips the
gather). Ratios are kernel speed-ups over each baseline. Those three share one fp32 cache that
stays in the CPU's caches; the kernel is also timed as the engine runs it, bf16 over 30 caches
(one per layer of the default model), so each call reads K/V from memory.

Prefill: our varlen kernel vs the SDPA path (one SDPA call per sequence) on the two batch shapes
the engine runs: whole prompts with nothing cached (SDPA reads the new K/V directly), and short
chunks after a long cached context (prefix-cache hits, chunked prefill, and the tokens budget
forcing inserts; SDPA gathers the context and masks). The engine's CPU prefill uses the faster.

Linear: the default model's linear layers (30 layers' qkv, o, gate_up and down, and the LM
head; separate weights per layer, so nothing is served from cache) at 1-32 rows and at 512 (a
prefill chunk), fp32 and bf16: csrc's `linear_few_rows`, csrc's `linear_amx` (bf16, on CPUs with
AMX) and `linear_dpbf16` (bf16, on CPUs with AVX512-BF16), torch's weight-only int4 kernel of
`--quantization int4` (groups of 32) and its int8 one (per-channel scales), each against oneDNN's
packed GEMM on the plain weights (the quantized kernels in bf16 only: with fp32 activations they
measured 4-130x slower than oneDNN here). Where they win is FEW_ROWS (few_rows_limit), AMX_ROWS, DPBF16_ROWS and INT4_ROWS in
server/models/packed_linear.py.

    python bench/kernels.py                         # SmolLM2-135M's attention shape
    python bench/kernels.py --num-seqs 64 --context 512 --heads 9 --kv-heads 3 --head-dim 64
    python bench/kernels.py --num-seqs 1 --context 32768 --only decode  # one long thought: split context
    python bench/kernels.py --only linear
"""

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from results_io import save

from server.models.int4 import Int4Weight, quantize_int4
from server.models.packed_linear import (AMX_ROWS, DPBF16_ROWS, amx_available, dpbf16_available, few_rows_limit,
                                         pack_for_amx, packs)
from server.models.paged_attention import (
    PrefillMetadata,
    paged_attention_decode,
    paged_attention_decode_reference,
    paged_attention_prefill_reference,
    prefill_sdpa,
)


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
    parser.add_argument("--prefill-seqs", type=int, default=8, help="sequences per prefill batch")
    parser.add_argument("--chunk", type=int, default=8, help="query tokens per chunk after a cached context")
    parser.add_argument("--only", choices=["decode", "prefill", "linear"], help="run one of the three")
    args = parser.parse_args()
    result = {"shape": vars(args)}
    for name, bench in (("decode", bench_decode), ("prefill", bench_prefill), ("linear", bench_linear)):
        if args.only in (None, name):
            result[name] = bench(args)
    save("kernels", result, args.out_dir)


# SmolLM2-135M: 30 layers, hidden 576, 9 + 3 + 3 heads of 64 (qkv 960), MLP 1536 (gate_up 3072), vocab 49152.
NUM_LAYERS = 30
LINEAR_SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)] * NUM_LAYERS + [(576, 49152)]


def bench_linear(args) -> dict:
    """Milliseconds for one step's linears (all 121) per row count, per dtype and kernel."""
    gen = torch.Generator().manual_seed(2)
    result = {}
    for dtype in (torch.float32, torch.bfloat16):
        if not packs(dtype):  # oneDNN has no bf16 on this CPU: nothing to compare against
            print(f"linear {str(dtype).removeprefix('torch.')}: skipped, oneDNN takes no {dtype} weights on this CPU")
            continue
        layers = [torch.nn.Linear(k, n, bias=False) for k, n in LINEAR_SHAPES]
        for layer in layers:
            layer.weight.data = torch.randn(layer.out_features, layer.in_features, generator=gen).div_(24).to(dtype)
        plain = [layer.weight.data for layer in layers]
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, 64) for w in plain]
        int4 = [Int4Weight(*quantize_int4(w), dtype) for w in plain] if dtype == torch.bfloat16 else []
        int8 = []
        for w in plain if dtype == torch.bfloat16 else []:  # symmetric, one scale per output channel
            scale = w.float().abs().amax(dim=1) / 127
            int8.append(((w.float() / scale[:, None]).round().to(torch.int8), scale.to(dtype)))
        tiles = [pack_for_amx(w) for w in plain] if dtype == torch.bfloat16 else []
        amx, dpbf16 = (tiles if amx_available() else []), (tiles if dpbf16_available() else [])
        rows_table = {}
        for rows in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 512):
            xs = [torch.randn(rows, k, generator=gen).to(dtype) for k, _ in LINEAR_SHAPES]
            outs = [torch.empty(rows, n, dtype=dtype) for _, n in LINEAR_SHAPES]

            def few_rows():
                for x, w, o in zip(xs, plain, outs):
                    torch.ops.s1serve.linear_few_rows(o, x, w, None)

            def onednn():
                for x, p in zip(xs, packed):
                    torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")

            kernels = {"onednn": onednn}
            if dtype == torch.bfloat16:
                kernels["int4"] = lambda: [w.matmul(x) for w, x in zip(int4, xs)]
                kernels["int8"] = lambda: [torch.ops.aten._weight_int8pack_mm(x, q, s) for (q, s), x in zip(int8, xs)]
            if rows <= 32:
                kernels["linear_few_rows"] = few_rows
            if amx and rows <= 96:
                kernels["linear_amx"] = lambda: [torch.ops.s1serve.linear_amx(o, x, p, None) for x, p, o in zip(xs, amx, outs)]
            if dpbf16 and rows <= 96:
                kernels["linear_dpbf16"] = lambda: [torch.ops.s1serve.linear_dpbf16(o, x, p, None)
                                                    for x, p, o in zip(xs, dpbf16, outs)]
            ms = {name: 1e3 * median_seconds(fn, max(3, args.repeats // 4)) for name, fn in kernels.items()}
            rows_table[rows] = {"ms": ms, "vs_onednn": {k: ms["onednn"] / v for k, v in ms.items() if k != "onednn"}}
            print(f"linear {str(dtype).removeprefix('torch.'):8s} rows {rows:3d}: "
                  + "  ".join(f"{k} {v:7.2f} ms" for k, v in ms.items()), flush=True)
        result[str(dtype).removeprefix("torch.")] = {"few_rows_limit": few_rows_limit(dtype), "amx_rows_limit": AMX_ROWS if amx else 0,
                                                   "dpbf16_rows_limit": DPBF16_ROWS if dpbf16 and not amx else 0,
                                                   "rows": rows_table}
    return result


def bench_decode(args) -> dict:
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
    # The engine's regime: bf16, a cache per layer, so every call reads K/V the other layers have
    # pushed out of the CPU's caches (the figures above reuse one fp32 cache that stays warm).
    cold_layers = [(torch.randn(shape, generator=gen).bfloat16(), torch.randn(shape, generator=gen).bfloat16())
                   for _ in range(NUM_LAYERS)]
    query_bf16 = query.bfloat16()

    def bf16_cold_layers():
        for k, v in cold_layers:
            paged_attention_decode(query_bf16, k, v, block_tables, context_lens, scale)

    timings = {
        "csrc_kernel": median_seconds(lambda: paged_attention_decode(*args_), args.repeats),
        "torch_reference": median_seconds(lambda: paged_attention_decode_reference(*args_), args.repeats),
        "sdpa_pregathered": median_seconds(sdpa_pregathered, args.repeats),
        "csrc_kernel_bf16_cold_per_layer": median_seconds(bf16_cold_layers, args.repeats) / NUM_LAYERS,
    }
    kv_bytes = 2 * int(context_lens.sum()) * args.kv_heads * args.head_dim * 4
    result = {
        "total_context_tokens": int(context_lens.sum()),
        "median_seconds": timings,
        "kernel_gb_per_s": kv_bytes / timings["csrc_kernel"] / 1e9,
        "kernel_bf16_cold_gb_per_s": kv_bytes / 2 / timings["csrc_kernel_bf16_cold_per_layer"] / 1e9,
        "speedup_vs_reference": timings["torch_reference"] / timings["csrc_kernel"],
        "speedup_vs_sdpa_pregathered": timings["sdpa_pregathered"] / timings["csrc_kernel"],
    }
    for name, seconds in timings.items():
        print(f"{name:31s} {seconds * 1e3:9.3f} ms")
    print(f"kernel reads K/V at {result['kernel_gb_per_s']:.2f} GB/s (bf16, cold: {result['kernel_bf16_cold_gb_per_s']:.2f})")
    print(f"kernel speed-up: {result['speedup_vs_reference']:.2f}x vs reference, "
          f"{result['speedup_vs_sdpa_pregathered']:.2f}x vs SDPA on pre-gathered K/V")
    return result


def bench_prefill(args) -> dict:
    """Kernel vs per-sequence SDPA on both batch shapes, each checked against the reference first."""
    gen = torch.Generator().manual_seed(1)
    return {
        "whole_prompts": bench_prefill_batch(args, gen, chunk=None),
        "chunks_after_cached_context": bench_prefill_batch(args, gen, chunk=args.chunk),
    }


def bench_prefill_batch(args, gen: torch.Generator, chunk: int | None) -> dict:
    bs, kv_heads, head_dim = args.block_size, args.kv_heads, args.head_dim
    scale = head_dim**-0.5
    context_lens = torch.randint(16, args.context + 1, (args.prefill_seqs,), generator=gen).tolist()
    query_lens = context_lens if chunk is None else [min(chunk, n) for n in context_lens]
    num_blocks = sum(-(-n // bs) for n in context_lens)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [[order.pop() for _ in range(-(-n // bs))] for n in context_lens]
    meta = PrefillMetadata.build(query_lens, context_lens, tables, torch.device("cpu"))
    k_cache = torch.randn(num_blocks, bs, kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, bs, kv_heads, head_dim, generator=gen)
    query = torch.randn(sum(query_lens), args.heads, head_dim, generator=gen)
    # The new tokens' K/V, as the model hands them over (already in the cache at their slots).
    key, value = (
        torch.cat([cache[t].flatten(0, 1)[n - q : n] for t, n, q in zip(tables, context_lens, query_lens)])
        for cache in (k_cache, v_cache)
    )

    def kernel():
        out = torch.empty_like(query)
        torch.ops.s1serve.paged_attention_prefill(
            out, query, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q, meta.cu_seqlens_k, scale)
        return out

    def sdpa():
        return prefill_sdpa(query, key, value, k_cache, v_cache, meta, scale)

    want = paged_attention_prefill_reference(query, k_cache, v_cache, meta, scale)
    torch.testing.assert_close(kernel(), want)
    torch.testing.assert_close(sdpa(), want)
    timings = {"csrc_kernel": median_seconds(kernel, args.repeats), "sdpa": median_seconds(sdpa, args.repeats)}
    result = {
        "query_tokens": sum(query_lens), "context_tokens": sum(context_lens), "median_seconds": timings,
        "speedup_vs_sdpa": timings["sdpa"] / timings["csrc_kernel"],
    }
    shape = "whole prompts" if chunk is None else f"{chunk}-token chunks after cached context"
    print(f"prefill, {shape}: {sum(query_lens)} query tokens over {sum(context_lens)} context tokens: "
          f"kernel {timings['csrc_kernel'] * 1e3:.3f} ms, SDPA {timings['sdpa'] * 1e3:.3f} ms, "
          f"kernel speed-up {result['speedup_vs_sdpa']:.2f}x")
    return result


if __name__ == "__main__":
    main()
