"""BlockManager bookkeeping, in pure Python (no model, no torch)."""

from server.engine.block_manager import BlockManager
from server.engine.params import SamplingParams
from server.engine.sequence import Sequence


def seq(tokens, rid="r") -> Sequence:
    return Sequence(rid, list(tokens), SamplingParams(), seed=0)


def compute_all(bm: BlockManager, s: Sequence) -> None:
    """Pretend the runner computed every token of `s` (as the engine's postprocess does)."""
    s.num_computed_tokens = s.num_tokens
    bm.cache_full_blocks(s)


def test_allocate_and_free_return_every_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(range(10))
    assert bm.allocate(a, [], a.num_tokens)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 5
    bm.free(a)
    assert bm.num_free_blocks == 8 and all(c == 0 for c in bm.ref_counts)


def test_allocation_beyond_the_pool_fails_without_side_effects():
    bm = BlockManager(num_blocks=2, block_size=4)
    a = seq(range(9))
    assert not bm.allocate(a, [], a.num_tokens)
    assert bm.num_free_blocks == 2 and a.block_table == []


def test_shared_full_blocks_are_reused_and_ref_counted():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(list(range(12)) + [100, 101], "a")
    bm.allocate(a, [], a.num_tokens)
    compute_all(bm, a)
    b = seq(list(range(12)) + [200], "b")
    hits = bm.find_cached_prefix(b)
    assert hits == a.block_table[:3]
    assert bm.allocate(b, hits, b.num_tokens - 12)
    assert b.num_computed_tokens == 12
    assert [bm.ref_counts[x] for x in hits] == [2, 2, 2]
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 16


def test_last_token_is_always_left_to_compute():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(range(8), "a")
    bm.allocate(a, [], 8)
    compute_all(bm, a)
    same = seq(range(8), "b")
    assert len(bm.find_cached_prefix(same)) == 1  # not 2: token 7 must produce logits
    bm.free(a)


def test_freed_blocks_keep_their_prefix_until_reused():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq(range(9), "a")
    bm.allocate(a, [], 9)
    compute_all(bm, a)
    bm.free(a)
    b = seq(list(range(8)) + [50], "b")
    hits = bm.find_cached_prefix(b)
    assert len(hits) == 2
    assert bm.allocate(b, hits, 1)
    assert bm.num_free_blocks == 1
    bm.free(b)
    # Fill the pool with unrelated tokens: the old prefix is evicted.
    c = seq(range(1000, 1016), "c")
    bm.allocate(c, [], 16)
    compute_all(bm, c)
    bm.free(c)
    assert bm.find_cached_prefix(seq(list(range(8)) + [50])) == []


def test_disabled_prefix_caching_never_hits():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = seq(range(9), "a")
    bm.allocate(a, [], 9)
    compute_all(bm, a)
    assert bm.find_cached_prefix(seq(range(9), "b")) == []
    bm.free(a)
