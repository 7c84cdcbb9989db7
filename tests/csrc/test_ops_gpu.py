"""The CUDA ops against the same references, and the engine on the GPU (marked `gpu`; skipped
without CUDA). Half-precision tolerances: inputs are rounded to bf16/fp16, accumulation is fp32."""

import pytest
import torch

from server.engine import SamplingParams
from server.models.paged_attention import (
    attention_backend,
    paged_attention_decode,
    paged_attention_decode_reference,
    paged_attention_prefill,
    paged_attention_prefill_reference,
    prefill_backend,
    prefill_flash_attn,
    prefill_sdpa,
    reshape_and_cache,
    reshape_and_cache_reference,
    through_decode_kernel,
    through_paged_prefill_kernel,
)
from tests.conftest import hf_greedy, random_prompts

from .test_ops import POISON, random_paged_batch, random_prefill_batch, relative_error

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def test_cuda_runs_the_compiled_kernels():
    assert attention_backend("cuda") == "csrc-cuda"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 8), (8, 2), (28, 4), (9, 3)])
def test_decode_matches_reference_on_cuda(dtype, block_size, head_dim, num_heads, num_kv_heads):
    seed = int(torch.randint(0, 2**31, ()).item())
    lens = [1, 3, block_size, block_size + 1, 2 * block_size - 1, 77, 300]
    batch = [t.cuda() for t in random_paged_batch(lens, num_heads, num_kv_heads, head_dim, block_size, seed, dtype)]
    got = paged_attention_decode(*batch, head_dim**-0.5)
    as_fp64 = [t.double() if t.is_floating_point() else t for t in batch]
    want = paged_attention_decode_reference(*as_fp64, head_dim**-0.5)
    assert relative_error(got, want) < TOLERANCE[dtype], f"seed {seed}"


PARTITION = 512  # csrc/cuda/kernels.h kDecodePartitionTokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("group", range(1, 9))
def test_split_kv_decode_matches_reference_for_every_group_and_head_dim(dtype, head_dim, group):
    """Contexts on both sides of the partition edges (one partition written directly, several
    merged), GQA groups 1-8 (the kernel rounds a group up to 1, 2, 4 or 8 internally)."""
    seed = int(torch.randint(0, 2**31, ()).item())
    lens = [1, 7, PARTITION - 1, PARTITION, PARTITION + 1, 3 * PARTITION + 5]
    batch = [t.cuda() for t in random_paged_batch(lens, 2 * group, 2, head_dim, 16, seed, dtype)]
    got = paged_attention_decode(*batch, head_dim**-0.5)
    want = paged_attention_decode_reference(*(t.double() if t.is_floating_point() else t for t in batch), head_dim**-0.5)
    assert relative_error(got, want) < TOLERANCE[dtype], f"seed {seed}"


@pytest.mark.parametrize("group", range(1, 9))
def test_split_kv_decode_on_cuda_is_stable_at_32k_context(group):
    """A 32k context is 64 partitions; peaked scores (query x 8) stress the merge's rescaling."""
    batch = [t.cuda() for t in random_paged_batch([32768, 7], 4 * group, 4, 128, 16, seed=group)]
    query = batch[0] * 8
    got = paged_attention_decode(query, *batch[1:], 1.0)
    want = paged_attention_decode_reference(*(t.double() if t.is_floating_point() else t for t in (query, *batch[1:])), 1.0)
    assert torch.isfinite(got).all() and relative_error(got, want) < 1e-5


def test_cuda_decode_binding_refuses_what_would_fault_on_the_device():
    query, k_cache, v_cache, tables, lens = (t.cuda() for t in random_paged_batch([40, 9], 8, 2, 128, 16, seed=3))
    op = torch.ops.s1serve.paged_attention_decode
    out = torch.empty_like(query)
    cases = {
        "block_tables": (out, query, k_cache, v_cache, tables.cpu(), lens),  # a host table: an illegal address
        "one row per query": (out, query, k_cache, v_cache, tables[:1], lens),
        "dtypes differ": (out, query, k_cache, v_cache.half(), tables, lens),
        "16-byte aligned": (out, torch.empty(query.numel() + 1, dtype=query.dtype, device="cuda")[1:].view_as(query),
                            k_cache, v_cache, tables, lens),
        "not supported": (torch.empty(2, 18, 128, device="cuda"), torch.zeros(2, 18, 128, device="cuda"),
                          k_cache, v_cache, tables, lens),  # a group of 9
    }
    for message, args in cases.items():
        with pytest.raises(RuntimeError, match=message):
            op(*args, 1.0)
    torch.cuda.synchronize()  # nothing faulted on the device


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_short_chunks_after_cached_context_read_the_cache_through_the_decode_kernel_on_cuda(dtype):
    """Budget forcing's Wait and forced-end chunks: no gather, the same result as the reference."""
    query, _, _, k_cache, v_cache, meta = random_prefill_batch([9, 40, 2000, 3], [3, 1, 12, 3], 8, 2, 128, 16, 5, dtype)
    for name in ("cu_seqlens_q", "cu_seqlens_k", "block_tables"):
        setattr(meta, name, getattr(meta, name).cuda())
    query, k_cache, v_cache = query.cuda(), k_cache.cuda(), v_cache.cuda()
    assert through_decode_kernel("cuda", meta)
    got = paged_attention_prefill(query, None, None, k_cache, v_cache, meta, 128**-0.5)
    want = paged_attention_prefill_reference(query.double(), k_cache.double(), v_cache.double(), meta, 128**-0.5)
    assert relative_error(got, want) < TOLERANCE[dtype]


def on_cuda(batch):
    query, key, value, k_cache, v_cache, meta = batch
    for name in ("cu_seqlens_q", "cu_seqlens_k", "block_tables"):
        setattr(meta, name, getattr(meta, name).cuda())
    return query.cuda(), key.cuda(), value.cuda(), k_cache.cuda(), v_cache.cuda(), meta


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("group", range(1, 9))
@pytest.mark.parametrize("block_size", [1, 16])
def test_paged_prefill_kernel_matches_reference_for_every_group_and_head_dim(dtype, head_dim, group, block_size):
    """Chunks after cached context (tile and key-step edges on both sides), a whole prompt and a
    one-token chunk in one batch, read through the block tables by csrc/cuda's prefill kernel."""
    seed = int(torch.randint(0, 2**31, ()).item())
    context_lens, query_lens = [1, 70, 200, 129, 1000, 65], [1, 70, 65, 128, 300, 1]
    query, _, _, k_cache, v_cache, meta = on_cuda(
        random_prefill_batch(context_lens, query_lens, 2 * group, 2, head_dim, block_size, seed, dtype))
    out = torch.full_like(query, float("nan"))
    torch.ops.s1serve.paged_attention_prefill(out, query, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q,
                                              meta.cu_seqlens_k, head_dim**-0.5)
    want = paged_attention_prefill_reference(query.double(), k_cache.double(), v_cache.double(), meta, head_dim**-0.5)
    assert relative_error(out, want) < TOLERANCE[dtype], f"seed {seed}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_long_chunks_after_cached_context_read_the_cache_through_the_prefill_kernel_on_cuda(dtype):
    """A follow-up turn of 300 tokens after a 16k context: no gather, the reference's result."""
    query, key, value, k_cache, v_cache, meta = on_cuda(
        random_prefill_batch([16384, 400], [300, 400], 28, 4, 128, 16, seed=5, dtype=dtype))
    assert not through_decode_kernel("cuda", meta) and through_paged_prefill_kernel(query, meta)
    got = paged_attention_prefill(query, key, value, k_cache, v_cache, meta, 128**-0.5)
    want = paged_attention_prefill_reference(query.double(), k_cache.double(), v_cache.double(), meta, 128**-0.5)
    assert torch.isfinite(got).all() and relative_error(got, want) < TOLERANCE[dtype]


def test_cuda_prefill_binding_refuses_what_it_does_not_cover():
    query, _, _, k_cache, v_cache, meta = on_cuda(
        random_prefill_batch([40, 9], [8, 9], 8, 2, 128, 16, seed=3, dtype=torch.bfloat16))
    op = torch.ops.s1serve.paged_attention_prefill
    out = torch.empty_like(query)
    cu_q, cu_k, tables = meta.cu_seqlens_q, meta.cu_seqlens_k, meta.block_tables
    cases = {
        "block_tables": (out, query, k_cache, v_cache, tables.cpu(), cu_q, cu_k),
        "one entry per sequence": (out, query, k_cache, v_cache, tables[:1], cu_q, cu_k),
        "int32": (out, query, k_cache, v_cache, tables, cu_q.long(), cu_k),
        "float16 or bfloat16": (out.float(), query.float(), k_cache.float(), v_cache.float(), tables, cu_q, cu_k),
        "dtypes differ": (out, query, k_cache, v_cache.half(), tables, cu_q, cu_k),
    }
    for message, args in cases.items():
        with pytest.raises(RuntimeError, match=message):
            op(*args, 1.0)
    torch.cuda.synchronize()  # nothing faulted on the device


def cuda_prefill_batch(dtype, block_size, seed):
    """Whole prompts, chunks after cached context and one-token chunks, on the GPU."""
    bs = block_size
    context_lens, query_lens = [1, 5, bs + 1, 40, 77, 300], [1, 5, bs, 17, 77, 33]
    query, key, value, k_cache, v_cache, meta = random_prefill_batch(context_lens, query_lens, 8, 2, 128, bs, seed, dtype)
    for name in ("cu_seqlens_q", "cu_seqlens_k", "block_tables"):
        setattr(meta, name, getattr(meta, name).cuda())
    return query.cuda(), key.cuda(), value.cuda(), k_cache.cuda(), v_cache.cuda(), meta


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [1, 16])
def test_prefill_matches_reference_on_cuda(dtype, block_size):
    """Whichever backend the GPU runs (flash-attn when installed, else SDPA), and SDPA always."""
    seed = int(torch.randint(0, 2**31, ()).item())
    query, key, value, k_cache, v_cache, meta = cuda_prefill_batch(dtype, block_size, seed)
    want = paged_attention_prefill_reference(query.double(), k_cache.double(), v_cache.double(), meta, 128**-0.5)
    got = paged_attention_prefill(query, key, value, k_cache, v_cache, meta, 128**-0.5)
    assert relative_error(got, want) < TOLERANCE[dtype], f"{prefill_backend('cuda')}, seed {seed}"
    sdpa = prefill_sdpa(query, key, value, k_cache, v_cache, meta, 128**-0.5)
    assert relative_error(sdpa, want) < TOLERANCE[dtype], f"sdpa, seed {seed}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flash_attn_varlen_prefill_matches_reference(dtype):
    pytest.importorskip("flash_attn", reason="the gpu extra (flash-attn) is not installed")
    assert prefill_backend("cuda") == "flash-attn"
    query, key, value, k_cache, v_cache, meta = cuda_prefill_batch(dtype, 16, seed=4)
    want = paged_attention_prefill_reference(query.double(), k_cache.double(), v_cache.double(), meta, 128**-0.5)
    got = prefill_flash_attn(query, key, value, k_cache, v_cache, meta, 128**-0.5)
    assert relative_error(got, want) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reshape_and_cache_on_cuda_matches_reference(dtype):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    caches = [torch.full((12, 16, 4, 128), POISON, dtype=dtype, device="cuda") for _ in range(4)]
    slots = torch.randperm(12 * 16, generator=gen)[:50].cuda()
    slots[::7] = -1
    fused = torch.randn(50, 3 * 4 * 128, generator=gen).to(dtype).cuda()  # strided rows, as from qkv_proj
    key, value = fused[:, 512:1024].view(50, 4, 128), fused[:, 1024:].view(50, 4, 128)
    reshape_and_cache(key, value, caches[0], caches[1], slots)
    reshape_and_cache_reference(key, value, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


def test_engine_greedy_equals_transformers_in_fp32_on_cuda(make_llm, model_dir):
    from server.models import ModelConfig

    prompts = random_prompts(16, ModelConfig.from_model_dir(model_dir).vocab_size - 20, seed=7)
    llm = make_llm(model_dir, device="cuda", dtype="float32", num_kv_blocks=256)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24))
    assert [o.token_ids for o in outputs] == hf_greedy(model_dir, prompts, 24)
