"""The csrc ops (torch.ops.s1serve) against their pure-torch references on fresh random inputs.

Cache slots no sequence owns are poisoned with a huge value first: a kernel that reads past a
context length or through the wrong block produces an error far above the tolerance.
"""

import subprocess
import sys

import pytest
import torch

from server.models.paged_attention import (
    PrefillMetadata,
    attention_backend,
    gather_context,
    paged_attention_decode,
    paged_attention_decode_reference,
    paged_attention_prefill,
    paged_attention_prefill_reference,
    prefill_backend,
    prefill_sdpa,
    prefill_through_decode,
    through_decode_kernel,
    through_paged_prefill_kernel,
    reshape_and_cache,
    reshape_and_cache_reference,
)

POISON = 3e4  # fits fp16 too
OPS = ("paged_attention_decode", "paged_attention_prefill", "reshape_and_cache")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def random_paged_batch(context_lens, num_heads, num_kv_heads, head_dim, block_size, seed, dtype=torch.float32):
    """Caches holding each sequence's K/V in randomly placed blocks; every other slot is poisoned."""
    gen = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(blocks_needed) + 3  # spare blocks stay poisoned
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, POISON, dtype=dtype)
    v_cache = torch.full(shape, POISON, dtype=dtype)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max(blocks_needed)
    block_tables = torch.zeros(len(context_lens), max_blocks, dtype=torch.long)
    for i, (n, nb) in enumerate(zip(context_lens, blocks_needed)):
        table = [order.pop() for _ in range(nb)]
        block_tables[i, :nb] = torch.tensor(table)
        flat = torch.tensor([b * block_size + o for b in table for o in range(block_size)][:n])
        k_cache.view(-1, num_kv_heads, head_dim)[flat] = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        v_cache.view(-1, num_kv_heads, head_dim)[flat] = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
    query = torch.randn(len(context_lens), num_heads, head_dim, generator=gen).to(dtype)
    return query, k_cache, v_cache, block_tables, torch.tensor(context_lens, dtype=torch.long)


def random_prefill_batch(context_lens, query_lens, num_heads, num_kv_heads, head_dim, block_size, seed,
                         dtype=torch.float32):
    """A varlen prefill batch over a poisoned paged cache: sequence i's last query_lens[i] of
    context_lens[i] tokens are the new ones. Returns query, new key/value, caches and metadata."""
    _, k_cache, v_cache, tables, _ = random_paged_batch(context_lens, num_heads, num_kv_heads, head_dim, block_size,
                                                        seed, dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    query = torch.randn(sum(query_lens), num_heads, head_dim, generator=gen).to(dtype)
    meta = PrefillMetadata.build(query_lens, context_lens,
                                 [t[: -(-n // block_size)].tolist() for t, n in zip(tables, context_lens)],
                                 torch.device("cpu"))
    keys, values = gather_context(k_cache, v_cache, meta)
    new = torch.cat([torch.arange(int(end) - q, int(end)) for end, q in zip(meta.cu_seqlens_k[1:], query_lens)])
    return query, keys[new], values[new], k_cache, v_cache, meta


def test_the_cpu_runs_the_compiled_kernels_not_the_reference():
    assert attention_backend("cpu") == "csrc-cpu"
    assert prefill_backend("cpu") == "csrc-cpu"
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"s1serve::{op}", "CPU")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="built with OpenMP on Linux only (setup.py)")
def test_the_extension_links_openmp_so_parallel_for_uses_every_thread():
    """at::parallel_for is header code that splits work with `#pragma omp parallel`: built without
    -fopenmp, every CPU kernel silently runs on one thread (sessions 1-3 ran that way)."""
    import server._C

    linked = subprocess.run(["ldd", server._C.__file__], capture_output=True, text=True, check=True).stdout
    assert "libgomp" in linked


@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("head_dim", [64, 128, 16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (9, 3), (12, 1)])
def test_decode_matches_reference(block_size, head_dim, num_heads, num_kv_heads):
    seed = int(torch.randint(0, 2**31, ()).item())  # fresh inputs each run; printed on failure
    lens = [1, block_size, block_size + 1, 2 * block_size - 1, 3 * block_size, 77, 200]
    batch = random_paged_batch(lens, num_heads, num_kv_heads, head_dim, block_size, seed)
    scale = head_dim**-0.5
    got = paged_attention_decode(*batch, scale)
    want = paged_attention_decode_reference(*batch, scale)
    assert relative_error(got, want) < 1e-5, f"seed {seed}"


@pytest.mark.parametrize("num_seqs", [1, 2, 64])  # below and above the per-sequence task split
def test_decode_matches_reference_for_every_batch_size(num_seqs):
    seed = int(torch.randint(0, 2**31, ()).item())
    lens = torch.randint(1, 100, (num_seqs,), generator=torch.Generator().manual_seed(seed)).tolist()
    batch = random_paged_batch(lens, 6, 2, 64, 16, seed)
    assert relative_error(paged_attention_decode(*batch, 0.125), paged_attention_decode_reference(*batch, 0.125)) < 1e-5


@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("lens", [[5000], [3000, 2], [1500, 700, 9]])
def test_few_long_sequences_split_their_context_and_merge_to_the_reference(block_size, lens):
    """Fewer sequences than 4 tasks per thread and contexts of 512+ tokens: each context is split
    into partitions computed apart and merged; a sequence shorter than the longest leaves some
    of its partitions empty."""
    seed = int(torch.randint(0, 2**31, ()).item())
    batch = random_paged_batch(lens, 9, 3, 64, block_size, seed)
    assert relative_error(paged_attention_decode(*batch, 0.125), paged_attention_decode_reference(*batch, 0.125)) < 1e-5, seed
    bf16 = [t.bfloat16() if t.is_floating_point() else t for t in batch]
    want = paged_attention_decode_reference(*(t.float() if t.is_floating_point() else t for t in bf16), 0.125)
    assert relative_error(paged_attention_decode(*bf16, 0.125).float(), want) < 1e-2, seed


def test_decode_is_stable_at_32k_context_with_peaked_scores():
    """Online softmax over 2048 blocks: large logits must neither overflow nor lose precision."""
    batch = random_paged_batch([32768, 5], 4, 2, 64, 16, seed=1)
    query = batch[0] * 8  # scores of +-100: a naive exp overflows in fp32
    got = paged_attention_decode(query, *batch[1:], 1.0)
    q64, k64, v64 = (t.double() for t in (query, batch[1], batch[2]))
    want = paged_attention_decode_reference(q64, k64, v64, batch[3], batch[4], 1.0)
    assert torch.isfinite(got).all()
    assert relative_error(got, want) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_in_half_precision_accumulates_in_fp32(dtype):
    batch = random_paged_batch([1, 16, 33, 300], 8, 2, 64, 16, seed=3, dtype=dtype)
    got = paged_attention_decode(*batch, 0.125)
    want = paged_attention_decode_reference(*(t.float() if t.is_floating_point() else t for t in batch), 0.125)
    assert relative_error(got.float(), want) < 1e-2


@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("head_dim", [32, 64, 128, 48])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (9, 3), (12, 1)])
def test_bf16_decode_matches_reference_on_every_block_tail(block_size, head_dim, num_heads, num_kv_heads):
    """A bf16 cache on AVX512-BF16 takes dot products on the cached bf16 values as they are and
    pairs V rows (head_dim a multiple of 32; 48 takes the widening path): odd block tails, one-row
    blocks and every GQA group must land in the right columns."""
    seed = int(torch.randint(0, 2**31, ()).item())
    lens = [1, block_size + 1, 2 * block_size - 1, 33, 77, 300]
    batch = random_paged_batch(lens, num_heads, num_kv_heads, head_dim, block_size, seed, dtype=torch.bfloat16)
    scale = head_dim**-0.5
    want = paged_attention_decode_reference(*(t.float() if t.is_floating_point() else t for t in batch), scale)
    assert relative_error(paged_attention_decode(*batch, scale).float(), want) < 1e-2, f"seed {seed}"


@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("head_dim", [64, 128, 16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (9, 3), (12, 1)])
def test_prefill_matches_reference(block_size, head_dim, num_heads, num_kv_heads):
    """Whole prompts, chunks after cached context, one-token chunks, tiles of 16 rows and block
    boundaries, all in one varlen batch."""
    seed = int(torch.randint(0, 2**31, ()).item())
    bs = block_size
    cases = [(1, 1), (5, 5), (bs, 3), (bs + 1, bs), (2 * bs - 1, 1), (40, 17), (77, 77), (200, 33), (3 * bs, 2 * bs)]
    context_lens = [n for n, _ in cases]
    query_lens = [min(q, n) for n, q in cases]
    query, _, _, k_cache, v_cache, meta = random_prefill_batch(context_lens, query_lens, num_heads, num_kv_heads,
                                                                head_dim, block_size, seed)
    got = paged_attention_prefill(query, None, None, k_cache, v_cache, meta, head_dim**-0.5)
    want = paged_attention_prefill_reference(query.double(), k_cache.double(), v_cache.double(), meta, head_dim**-0.5)
    assert relative_error(got, want) < 1e-5, f"seed {seed}"


@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("head_dim", [32, 64, 128, 48])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (9, 3), (12, 1)])
def test_bf16_prefill_matches_reference_on_every_tile_and_block_tail(block_size, head_dim, num_heads, num_kv_heads):
    """A bf16 cache on AVX512-BF16 runs the prefill's products on bf16 pairs (head_dim a multiple
    of 32; 48 takes the widening path): partial tiles of rows, odd block tails and cached context."""
    seed = int(torch.randint(0, 2**31, ()).item())
    bs = block_size
    cases = [(1, 1), (5, 5), (bs + 1, bs), (2 * bs - 1, 1), (40, 17), (77, 77), (200, 33)]
    query, _, _, k_cache, v_cache, meta = random_prefill_batch([n for n, _ in cases], [min(q, n) for n, q in cases],
                                                                num_heads, num_kv_heads, head_dim, block_size, seed,
                                                                torch.bfloat16)
    got = paged_attention_prefill(query, None, None, k_cache, v_cache, meta, head_dim**-0.5)
    want = paged_attention_prefill_reference(query.float(), k_cache.float(), v_cache.float(), meta, head_dim**-0.5)
    assert relative_error(got.float(), want) < 1e-2, f"seed {seed}"


def test_the_sdpa_prefill_path_matches_reference():
    """The path CUDA takes without flash-attn, checked here on the CPU."""
    seed = int(torch.randint(0, 2**31, ()).item())
    query, key, value, k_cache, v_cache, meta = random_prefill_batch([9, 40, 64], [9, 7, 64], 8, 2, 64, 16, seed)
    got = prefill_sdpa(query, key, value, k_cache, v_cache, meta, 0.125)
    assert relative_error(got, paged_attention_prefill_reference(query, k_cache, v_cache, meta, 0.125)) < 1e-5


def test_short_chunks_after_cached_context_match_the_reference_through_the_decode_kernel():
    """The path CUDA takes for budget forcing's Wait / forced-end chunks (each query row as a
    decode row over its causal prefix), checked here with the CPU decode kernel; whole prompts
    in the same batch ride along as rows of their own."""
    seed = int(torch.randint(0, 2**31, ()).item())
    query, _, _, k_cache, v_cache, meta = random_prefill_batch([9, 40, 700, 3], [3, 1, 12, 3], 8, 2, 64, 16, seed)
    got = prefill_through_decode(query, k_cache, v_cache, meta, 0.125)
    assert relative_error(got, paged_attention_prefill_reference(query, k_cache, v_cache, meta, 0.125)) < 1e-5
    tables, lens = meta.query_rows
    assert lens.tolist() == [7, 8, 9, 40, *range(689, 701), 1, 2, 3] and tables.shape[0] == 19
    assert meta.query_rows is meta.query_rows  # built once per step, shared by every layer


def test_only_short_chunks_after_cached_context_take_the_decode_kernel_and_only_on_cuda():
    short = random_prefill_batch([40, 9], [2, 9], 4, 2, 64, 16, seed=1)[-1]
    whole = random_prefill_batch([40, 9], [40, 9], 4, 2, 64, 16, seed=1)[-1]
    long_chunk = random_prefill_batch([200, 9], [65, 9], 4, 2, 64, 16, seed=1)[-1]
    assert not through_decode_kernel("cpu", short)  # the CPU prefill kernel reads the cache in place already
    if attention_backend("cuda") == "csrc-cuda":
        assert through_decode_kernel("cuda", short)
        assert not through_decode_kernel("cuda", whole) and not through_decode_kernel("cuda", long_chunk)


def test_only_chunks_after_cached_context_in_16_bit_take_the_paged_prefill_kernel_and_only_on_cuda():
    """The rest of a CUDA batch's prefill: whole prompts keep flash-attn (or SDPA), fp32 keeps SDPA."""
    query, *_, long_chunk = random_prefill_batch([200, 9], [65, 9], 4, 2, 64, 16, seed=1, dtype=torch.bfloat16)
    whole = random_prefill_batch([40, 9], [40, 9], 4, 2, 64, 16, seed=1)[-1]
    assert not through_paged_prefill_kernel(query, long_chunk)  # on the CPU: the CPU kernel, always
    if attention_backend("cuda") == "csrc-cuda":
        on_gpu = query.cuda()
        assert through_paged_prefill_kernel(on_gpu, long_chunk)
        assert not through_paged_prefill_kernel(on_gpu, whole) and not through_paged_prefill_kernel(on_gpu.float(), long_chunk)


def test_prefill_is_stable_at_32k_context_with_peaked_scores():
    """Scores of +-100 carry ~1e-5 relative error in fp32 itself (an ulp at 100 is 7.6e-6), so over
    40 rows torch's own fp32 computation lands just above 1e-5 against fp64; the kernel must do
    no worse than that."""
    query, _, _, k_cache, v_cache, meta = random_prefill_batch([32768, 20], [40, 20], 4, 2, 64, 16, seed=2)
    query = query * 8
    got = paged_attention_prefill(query, None, None, k_cache, v_cache, meta, 1.0)
    want = paged_attention_prefill_reference(query.double(), k_cache.double(), v_cache.double(), meta, 1.0)
    torch_fp32 = paged_attention_prefill_reference(query, k_cache, v_cache, meta, 1.0)
    assert torch.isfinite(got).all()
    assert relative_error(got, want) <= max(1e-5, 1.1 * relative_error(torch_fp32, want))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_in_half_precision_accumulates_in_fp32(dtype):
    query, _, _, k_cache, v_cache, meta = random_prefill_batch([16, 50, 300], [16, 9, 40], 8, 2, 64, 16, 3, dtype)
    got = paged_attention_prefill(query, None, None, k_cache, v_cache, meta, 0.125)
    want = paged_attention_prefill_reference(query.float(), k_cache.float(), v_cache.float(), meta, 0.125)
    assert relative_error(got.float(), want) < 1e-2


def test_prefill_rejects_a_query_longer_than_its_context():
    query, _, _, k_cache, v_cache, meta = random_prefill_batch([8], [8], 4, 2, 16, 4, seed=0)
    meta.cu_seqlens_k[1] = 7
    with pytest.raises(RuntimeError, match="query length <= context length"):
        paged_attention_prefill(query, None, None, k_cache, v_cache, meta, 0.25)


@pytest.mark.parametrize("block_size", [1, 16])
def test_reshape_and_cache_matches_reference_and_skips_negative_slots(block_size):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    num_blocks, kv_heads, head_dim, tokens = 40 // block_size + 4, 2, 64, 37
    caches = [torch.full((num_blocks, block_size, kv_heads, head_dim), POISON) for _ in range(4)]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[::5] = -1  # padding tokens
    key = torch.randn(tokens, kv_heads, head_dim, generator=gen)
    value = torch.randn(tokens, kv_heads, head_dim, generator=gen)
    reshape_and_cache(key, value, caches[0], caches[1], slots)
    reshape_and_cache_reference(key, value, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    written = caches[0].view(-1, kv_heads, head_dim)
    assert torch.equal(written[slots[slots >= 0]], key[slots >= 0])
    assert (written == POISON).all(dim=(1, 2)).sum() == num_blocks * block_size - int((slots >= 0).sum())


def test_reshape_and_cache_rejects_a_slot_outside_the_cache():
    cache = torch.zeros(2, 4, 1, 8)
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.s1serve.reshape_and_cache(torch.ones(1, 1, 8), torch.ones(1, 1, 8), cache, cache.clone(),
                                            torch.tensor([8]))


def test_ops_pass_torch_opcheck():
    """Schema (mutation annotations), fake-tensor and dispatch registrations are consistent."""
    query, k_cache, v_cache, tables, lens = random_paged_batch([5, 17], 4, 2, 16, 4, seed=0)
    torch.library.opcheck(torch.ops.s1serve.paged_attention_decode.default,
                          (torch.empty_like(query), query, k_cache, v_cache, tables, lens, 0.25))
    query, _, _, k_cache, v_cache, meta = random_prefill_batch([5, 17], [5, 3], 4, 2, 16, 4, seed=0)
    torch.library.opcheck(torch.ops.s1serve.paged_attention_prefill.default,
                          (torch.empty_like(query), query, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q,
                           meta.cu_seqlens_k, 0.25))
    key = torch.randn(3, 2, 16)
    torch.library.opcheck(torch.ops.s1serve.reshape_and_cache.default,
                          (key, key.clone(), k_cache, v_cache, torch.tensor([0, 5, -1])))


def test_the_cuda_decode_shape_rule_is_known_before_the_first_step():
    from server.models.paged_attention import cuda_decode_supported

    assert cuda_decode_supported(32, 8, 128) and cuda_decode_supported(28, 4, 128) and cuda_decode_supported(9, 3, 64)
    assert not cuda_decode_supported(64, 4, 128)  # a GQA group of 16
    assert not cuda_decode_supported(8, 8, 96)  # head_dim 96
    assert not cuda_decode_supported(6, 4, 64)  # heads not a multiple of KV heads
