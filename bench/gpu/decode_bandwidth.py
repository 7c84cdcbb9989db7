"""Decode attention bandwidth on a GPU: csrc's paged_attention_decode against the pure-torch
reference (and flash-attn's paged decode when it imports), for the s1 regime of few, long
sequences and for wide batches; Qwen2.5-7B's 28 query / 4 KV heads x 128, bf16.

Bandwidth = K/V bytes the batch must read / kernel time, next to the measured HBM copy bandwidth
(a device-to-device copy of 2 GiB). Every row also checks the kernel against the reference.

    python bench/gpu/decode_bandwidth.py --out results.json
"""

import argparse
import json
import time

import torch

from server.models.paged_attention import paged_attention_decode, paged_attention_decode_reference

CASES = [(1, 32768), (4, 16384), (64, 4096), (256, 1024)]
HEADS, KV_HEADS, HEAD_DIM, BLOCK = 28, 4, 128, 16


def timed(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def copy_bandwidth() -> float:
    x = torch.empty(2**30, dtype=torch.float16, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() * x.element_size() / timed(lambda: y.copy_(x), 10)


def case(batch: int, context: int) -> dict:
    torch.manual_seed(batch)
    blocks_per_seq = context // BLOCK
    num_blocks = batch * blocks_per_seq + 1
    k_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(num_blocks - 1, device="cuda")[: batch * blocks_per_seq].view(batch, blocks_per_seq) + 1
    lens = torch.full((batch,), context, dtype=torch.long, device="cuda")
    query = torch.randn(batch, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    scale = HEAD_DIM**-0.5
    ours = paged_attention_decode(query, k_cache, v_cache, tables, lens, scale)
    reference = paged_attention_decode_reference(query.float(), k_cache.float(), v_cache.float(), tables, lens, scale)
    kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * 2
    row = {"batch": batch, "context": context, "max_abs_err": float((ours.float() - reference).abs().max()),
           "csrc_s": timed(lambda: paged_attention_decode(query, k_cache, v_cache, tables, lens, scale))}
    row["torch_s"] = timed(lambda: paged_attention_decode_reference(query, k_cache, v_cache, tables, lens, scale), 5)
    try:
        from flash_attn import flash_attn_with_kvcache

        page = 256  # flash-attn's paged mode needs pages of a multiple of 256 tokens
        kp = k_cache[tables].reshape(batch * context // page, page, KV_HEADS, HEAD_DIM)
        vp = v_cache[tables].reshape_as(kp)
        ptable = torch.arange(kp.shape[0], device="cuda", dtype=torch.int32).view(batch, -1)
        seqlens = lens.to(torch.int32)
        row["flash_attn_s"] = timed(lambda: flash_attn_with_kvcache(query[:, None], kp, vp, cache_seqlens=seqlens,
                                                                    block_table=ptable, softmax_scale=scale))
    except ImportError:
        row["flash_attn_s"] = None
    for name in ("csrc", "torch", "flash_attn"):
        seconds = row[f"{name}_s"]
        row[f"{name}_gbps"] = kv_bytes / seconds / 1e9 if seconds else None
    return row


def chunk_after_context(context: int, chunk: int, path: str) -> dict:
    """One layer's attention for `chunk` new tokens after a `context`-token cache, bf16: the
    engine's path (`path`: "decode_kernel" for budget forcing's short chunks, "paged_prefill" for
    longer ones; both read the cache in place) against the gather of the whole context that
    flash-attn / SDPA need."""
    from server.models.paged_attention import (PrefillMetadata, gather_context, paged_attention_prefill,
                                               paged_attention_prefill_reference, prefill_flash_attn, prefill_sdpa,
                                               through_decode_kernel, through_paged_prefill_kernel)

    blocks = context // BLOCK
    k_cache = torch.randn(blocks + 1, BLOCK, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    v_cache = torch.randn_like(k_cache)
    table = (torch.randperm(blocks, device="cuda") + 1).tolist()
    meta = PrefillMetadata.build([chunk], [context], [table], torch.device("cuda"))
    query = torch.randn(chunk, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    scale = HEAD_DIM**-0.5
    short = through_decode_kernel("cuda", meta)
    assert short if path == "decode_kernel" else not short and through_paged_prefill_kernel(query, meta)
    keys, values = gather_context(k_cache, v_cache, meta)
    new_k, new_v = keys[-chunk:], values[-chunk:]
    ours = paged_attention_prefill(query, new_k, new_v, k_cache, v_cache, meta, scale)
    want = paged_attention_prefill_reference(query.float(), k_cache.float(), v_cache.float(), meta, scale)
    row = {"context": context, "chunk": chunk, "max_abs_err": float((ours.float() - want).abs().max()),
           f"{path}_s": timed(lambda: paged_attention_prefill(query, new_k, new_v, k_cache, v_cache, meta, scale)),
           "gather_s": timed(lambda: gather_context(k_cache, v_cache, meta)),
           "gather_and_sdpa_s": timed(lambda: prefill_sdpa(query, new_k, new_v, k_cache, v_cache, meta, scale))}
    try:
        row["gather_and_flash_attn_s"] = timed(
            lambda: prefill_flash_attn(query, new_k, new_v, k_cache, v_cache, meta, scale))
    except ImportError:
        row["gather_and_flash_attn_s"] = None
    row[f"{path}_tflops"] = 4 * chunk * context * HEADS * HEAD_DIM / row[f"{path}_s"] / 1e12
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "hbm_copy_gbps": copy_bandwidth() / 1e9, "cases": []}
    for batch, context in CASES:
        row = case(batch, context)
        row["csrc_share_of_copy_bandwidth"] = row["csrc_gbps"] / result["hbm_copy_gbps"]
        result["cases"].append(row)
        print(json.dumps(row), flush=True)
    result["forced_end_chunk"] = chunk_after_context(32768, 8, "decode_kernel")
    print(json.dumps(result["forced_end_chunk"]), flush=True)
    result["follow_up_chunk"] = chunk_after_context(32768, 512, "paged_prefill")
    print(json.dumps(result["follow_up_chunk"]), flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
