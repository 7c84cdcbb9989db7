"""The csrc ops (torch.ops.s1serve) against their pure-torch references on fresh random inputs.

Cache slots no sequence owns are poisoned with a huge value first: a kernel that reads past a
context length or through the wrong block produces an error far above the tolerance.
"""

import pytest
import torch

from server.models.paged_attention import (
    attention_backend,
    paged_attention_decode,
    paged_attention_decode_reference,
    reshape_and_cache,
    reshape_and_cache_reference,
)

POISON = 3e4  # fits fp16 too
OPS = ("paged_attention_decode", "reshape_and_cache")


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


def test_the_cpu_runs_the_compiled_kernels_not_the_reference():
    assert attention_backend("cpu") == "csrc-cpu"
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"s1serve::{op}", "CPU")


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
    key = torch.randn(3, 2, 16)
    torch.library.opcheck(torch.ops.s1serve.reshape_and_cache.default,
                          (key, key.clone(), k_cache, v_cache, torch.tensor([0, 5, -1])))
