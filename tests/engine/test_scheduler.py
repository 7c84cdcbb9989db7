"""Scheduling policy, driven without a model: the test plays the runner by advancing tokens."""

from server.engine.block_manager import BlockManager
from server.engine.params import SamplingParams
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence, SequenceStatus


def make(num_blocks=64, block_size=4, max_num_seqs=8, max_tokens=64):
    bm = BlockManager(num_blocks, block_size)
    return bm, Scheduler(bm, max_num_seqs, max_tokens)


def seq(n, rid, base=0) -> Sequence:
    return Sequence(rid, list(range(base, base + n)), SamplingParams(), seed=0)


def run_step(bm, sched):
    """What the engine does after a forward: mark tokens computed, append one sampled token."""
    batch = sched.schedule()
    for s, n in zip(batch.seqs, batch.num_new_tokens):
        s.num_computed_tokens += n
        bm.cache_full_blocks(s)
        if s.num_computed_tokens == s.num_tokens:
            s.token_ids.append(7)
    return batch


def test_token_budget_and_seq_limit_are_respected():
    bm, sched = make(max_num_seqs=3, max_tokens=20)
    for i in range(5):
        sched.add(seq(8, f"r{i}", base=100 * i))
    batch = run_step(bm, sched)
    assert sum(batch.num_new_tokens) <= 20
    assert [s.request_id for s in batch.seqs] == ["r0", "r1", "r2"]
    assert batch.num_new_tokens == [8, 8, 4]  # r2's prompt is chunked
    batch = run_step(bm, sched)
    # decodes of r0, r1 first, then the rest of r2's prompt; r3 waits for a free slot
    assert [(s.request_id, n) for s, n in zip(batch.seqs, batch.num_new_tokens)] == [("r0", 1), ("r1", 1), ("r2", 4)]
    assert len(sched.waiting) == 2


def test_kv_pressure_preempts_the_newest_and_readmits_it():
    bm, sched = make(num_blocks=6, block_size=4, max_tokens=64)
    old, new = seq(8, "old"), seq(8, "new", base=50)
    sched.add(old)
    sched.add(new)
    run_step(bm, sched)  # both prefilled: 2 blocks each + 1 slot needed next step each
    assert bm.num_free_blocks == 2
    for _ in range(4):
        run_step(bm, sched)
    # old keeps growing; when the pool runs dry, `new` (the newest) is the one preempted
    while new.status is SequenceStatus.RUNNING:
        run_step(bm, sched)
    assert new.status is SequenceStatus.WAITING and new.num_preemptions == 1
    assert new.num_computed_tokens == 0 and new.block_table == []
    assert sched.waiting[0] is new and old.status is SequenceStatus.RUNNING
    assert len(new.token_ids) > 8  # generated tokens are kept for the recompute


def test_a_sequence_that_outgrows_the_pool_preempts_itself():
    # The engine caps max_model_len at the pool size so this cannot loop; the scheduler must
    # still not corrupt state when it happens.
    bm, sched = make(num_blocks=2, block_size=4)
    a = seq(7, "a")
    sched.add(a)
    run_step(bm, sched)  # 7 computed, 8 tokens
    run_step(bm, sched)  # 8 computed (2 full blocks), 9 tokens
    batch = run_step(bm, sched)  # token 9 needs a third block: none exist
    assert len(batch) == 0
    assert a.status is SequenceStatus.WAITING and sched.num_preemptions == 1
    assert bm.num_free_blocks == 2
