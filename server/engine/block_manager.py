"""The KV-cache pool: fixed-size blocks, reference counts, and prefix caching of full blocks.

A block is identified by its index into the runner's KV tensors. A full block whose K/V are
computed is registered under a hash that chains the hash of the previous block with its own
token ids, so equal hashes mean equal prefixes. Freed blocks keep their hash until they are
handed out again (oldest-freed first), so a later request with the same prefix can revive them.
"""

import hashlib
from array import array

from .sequence import Sequence


def chain_hash(parent: bytes, token_ids: list[int]) -> bytes:
    """SHA-256 rather than Python's hash(): a crafted prompt must not collide with another user's prefix."""
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.hash_to_block: dict[bytes, int] = {}
        # Free blocks in the order they were freed; a dict is an ordered set with O(1) removal.
        self.free_blocks: dict[int, None] = dict.fromkeys(range(num_blocks))
        self.prefix_query_tokens = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hit_tokens = 0  # of which found

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _full_block_hashes(self, seq: Sequence, num_tokens: int) -> list[bytes]:
        """Extend `seq.block_hashes` to cover the full blocks among its first `num_tokens` tokens."""
        bs = self.block_size
        for i in range(len(seq.block_hashes), num_tokens // bs):
            parent = seq.block_hashes[i - 1] if i else b""
            seq.block_hashes.append(chain_hash(parent, seq.token_ids[i * bs : (i + 1) * bs]))
        return seq.block_hashes[: num_tokens // bs]

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks holding the longest cached prefix of a sequence that has none allocated.

        At least the last token is always left to compute: its logits are what the step samples from.
        """
        if not self.enable_prefix_caching:
            return []
        hits = []
        for h in self._full_block_hashes(seq, seq.num_tokens - 1):
            block = self.hash_to_block.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def allocate(self, seq: Sequence, cached_blocks: list[int], num_new_tokens: int) -> bool:
        """Admit a sequence: take its cached prefix blocks, then fresh blocks for `num_new_tokens`.

        Returns False (and changes nothing) when the pool cannot hold it.
        """
        num_cached_tokens = len(cached_blocks) * self.block_size
        revived = sum(1 for b in cached_blocks if self.ref_counts[b] == 0)
        fresh = self.blocks_needed(num_cached_tokens + num_new_tokens) - len(cached_blocks)
        if revived + fresh > self.num_free_blocks:
            return False
        for block in cached_blocks:
            if self.ref_counts[block] == 0:
                del self.free_blocks[block]
            self.ref_counts[block] += 1
        seq.block_table = list(cached_blocks)
        seq.num_computed_tokens = num_cached_tokens
        seq.num_registered_blocks = len(cached_blocks)
        self._take_fresh(seq, fresh)
        return True

    def count_prefix_lookup(self, seq: Sequence) -> None:
        """Record a prompt's first admission in the hit-rate counters."""
        if self.enable_prefix_caching:
            self.prefix_query_tokens += seq.num_prompt_tokens
            self.prefix_hit_tokens += seq.num_computed_tokens

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make room for `num_new_tokens` more computed tokens; False (no change) when out of blocks."""
        fresh = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if fresh > self.num_free_blocks:
            return False
        self._take_fresh(seq, fresh)
        return True

    def _take_fresh(self, seq: Sequence, count: int) -> None:
        for _ in range(count):
            block = next(iter(self.free_blocks))
            del self.free_blocks[block]
            stale = self.block_hash[block]
            if stale is not None:  # evict its old prefix-cache entry
                if self.hash_to_block.get(stale) == block:
                    del self.hash_to_block[stale]
                self.block_hash[block] = None
            self.ref_counts[block] = 1
            seq.block_table.append(block)

    def fork(self, parent: Sequence, child: Sequence) -> list[tuple[int, int]] | None:
        """Copy-on-write: `child` shares every full computed block of `parent` (reference counted;
        full blocks are never written again) and gets a fresh block for the partly filled last one,
        whose K/V the caller copies (the returned (source, destination) pairs). None, changing
        nothing, when no block is free for that copy. The child has parent's computed tokens."""
        bs = self.block_size
        full, partial = divmod(parent.num_computed_tokens, bs)
        if partial and not self.free_blocks:
            return None
        for block in parent.block_table[:full]:
            self.ref_counts[block] += 1
        child.block_table = parent.block_table[:full]
        child.block_hashes = parent.block_hashes[:full]
        child.num_registered_blocks = min(parent.num_registered_blocks, full)
        child.num_computed_tokens = parent.num_computed_tokens
        if not partial:
            return []
        self._take_fresh(child, 1)
        return [(parent.block_table[full], child.block_table[-1])]

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks that became full and computed during the last step."""
        if not self.enable_prefix_caching:
            return
        hashes = self._full_block_hashes(seq, seq.num_computed_tokens)
        for i in range(seq.num_registered_blocks, len(hashes)):
            block, h = seq.block_table[i], hashes[i]
            if self.block_hash[block] is None and h not in self.hash_to_block:
                self.block_hash[block] = h
                self.hash_to_block[h] = block
        seq.num_registered_blocks = len(hashes)

    def free(self, seq: Sequence) -> None:
        """Release a sequence's blocks; tail blocks first so shared prefixes are evicted last."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
        seq.block_table = []
        seq.num_computed_tokens = 0
