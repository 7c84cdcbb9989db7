"""Continuous batching: decide, every step, which sequences compute how many tokens.

Policy (vLLM v1 style, one token budget per step, no separate prefill/decode phases; one sequence
gets at most `long_prefill_token_threshold` tokens a step, so short requests are not queued
behind a long prompt's prefill):
1. Running sequences first, oldest first: each gets the tokens it still lacks (1 for a decode,
   the rest of its prompt for a chunked prefill), capped by the remaining token budget.
   If the KV pool cannot hold them, the newest running sequence is preempted by recompute
   (its blocks freed, it goes back to the front of the waiting queue) until it fits.
2. Then waiting sequences in arrival order, while the budget, `max_num_seqs` and free blocks
   allow; a long prompt is admitted with a chunk of the budget and finishes in later steps.
   Nothing new is admitted in a step that had to preempt, so a victim is not readmitted at once.
A preempted sequence keeps its generated tokens; its recompute is an ordinary (often
prefix-cached) prefill, so its output does not change.
"""

from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]  # tokens to compute for each sequence this step

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 long_prefill_token_threshold: int = 0):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # At most this many tokens of one sequence per step (0: no cap), so a long prompt is
        # prefilled in chunks beside other work instead of holding the whole step budget.
        self.chunk_cap = long_prefill_token_threshold or max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_scheduled_tokens = 0  # tokens computed so far, prompts and outputs (prefix-cache hits excluded)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        batch = ScheduledBatch([], [])
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.probe is not None:  # adaptive thinking: it waits for its probe's answer
                i += 1
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget, self.chunk_cap)
            while not self.blocks.append_slots(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                batch.seqs.append(seq)
                batch.num_new_tokens.append(n)
                budget -= n
                i += 1

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            if seq.probe is not None:  # preempted while its probe runs: readmitted once the probe answered
                break
            if self.running and len(self.running) + 1 + len(seq.pending_forks) > self.max_num_seqs:
                break  # its n samples would not fit beside the running ones
            cached = self.blocks.find_cached_prefix(seq)
            n = min(seq.num_tokens - len(cached) * self.blocks.block_size, budget, self.chunk_cap)
            if not self.blocks.allocate(seq, cached, n):
                break
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = seq.num_computed_tokens
                self.blocks.count_prefix_lookup(seq)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
        self.num_scheduled_tokens += sum(batch.num_new_tokens)
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence forked off a running one: it has its blocks and computed tokens already."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence from whichever queue holds it and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        # FORKING: never queued (it joins `running` when forked)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED
