"""Tensor parallelism on the CPU over gloo: a 2-rank engine (and a 4-rank one, whose ranks share
KV heads) produces the 1-rank engine's greedy output token for token, whatever the batch holds."""

import torch
import pytest

from server.engine import LLM, SamplingParams, ThinkBudget
from server.errors import InvalidConfigError

from ..conftest import assert_no_kv_leak, build_tiny_model, random_prompts

CONFIG = dict(num_kv_blocks=40, block_size=8, dtype="float32")  # small enough that the batch below preempts


def mixed_batch(vocab: int):
    """Mixed lengths, a shared prefix (prefix caching), budgeted requests and more work than the
    pool holds at once (preemption)."""
    prefix = random_prompts(1, vocab, seed=40, min_len=24, max_len=24)[0]
    prompts = random_prompts(6, vocab, seed=41, min_len=1, max_len=60)
    prompts += [prefix + tail for tail in random_prompts(4, vocab, seed=42, min_len=1, max_len=10)]
    budgets = [None] * 7 + [ThinkBudget(max_think=6), ThinkBudget(min_think=8, max_waits=1), ThinkBudget(max_think=20)]
    return prompts, budgets


def generate(llm: LLM, prompts, budgets):
    return [(o.token_ids, o.finish_reason) for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=56), budgets)]


@pytest.mark.parametrize("ranks", [2, 4])
def test_sharded_engine_equals_one_rank_token_for_token(model_dir, ranks):
    one = LLM(model_dir, **CONFIG)
    prompts, budgets = mixed_batch(len(one.tokenizer))
    expected = generate(one, prompts, budgets)
    assert one.engine.scheduler.num_preemptions > 0
    sharded = LLM(model_dir, tensor_parallel_size=ranks, **CONFIG)
    workers = sharded.engine.runner.workers.processes
    try:
        assert sharded.engine.runner.shard.kv_heads(sharded.engine.model_config) == max(1, 2 // ranks)
        assert generate(sharded, prompts, budgets) == expected
        assert sharded.engine.scheduler.num_preemptions > 0 and sharded.engine.block_manager.prefix_hit_tokens > 0
        # n samples fork copy-on-write on every rank alike
        fork = SamplingParams(temperature=1.0, seed=3, max_tokens=12, n=3)
        assert [s.token_ids for s in sharded.generate(prompts[0], fork)[0].samples] == \
            [s.token_ids for s in one.generate(prompts[0], fork)[0].samples]
        assert_no_kv_leak(sharded)
    finally:
        sharded.shutdown()
    assert sharded.engine.runner.workers is None and not any(p.is_alive() for p in workers)


def test_a_size_that_does_not_split_the_heads_is_refused_at_start_up(tmp_path):
    model = build_tiny_model(tmp_path / "three-heads", "llama", hidden_size=48, num_attention_heads=3, num_key_value_heads=3)
    with pytest.raises(InvalidConfigError, match="tensor_parallel_size: 2 does not divide the model's 3 attention heads"):
        LLM(model, tensor_parallel_size=2, num_kv_blocks=8)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available() or __import__("torch").cuda.device_count() < 2,
                    reason="needs two CUDA devices")
def test_two_ranks_on_nccl_equal_one_gpu(llama_dir):
    one = LLM(llama_dir, device="cuda", **CONFIG)
    prompts, budgets = mixed_batch(len(one.tokenizer))
    expected = generate(one, prompts, budgets)
    sharded = LLM(llama_dir, device="cuda", tensor_parallel_size=2, **CONFIG)
    try:
        assert generate(sharded, prompts, budgets) == expected
    finally:
        sharded.shutdown()


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available() or __import__("torch").cuda.device_count() < 2,
                    reason="needs two CUDA devices")
def test_two_ranks_with_no_pool_size_profile_their_gpus_and_serve(llama_dir):
    config = {k: v for k, v in CONFIG.items() if k not in ("num_kv_blocks", "kv_cache_gib")}
    sharded = LLM(llama_dir, device="cuda", tensor_parallel_size=2, **config)
    try:
        assert sharded.engine.runner.num_blocks > 0
        out = sharded.generate([[1, 2, 3, 4]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        assert len(out[0].token_ids) == 8
    finally:
        sharded.shutdown()


def _smallest_on_rank(rank: int, address: str, values: list[int], results) -> None:
    from server.engine.tensor_parallel import init_group, smallest_across_ranks

    init_group(rank, len(values), address, "gloo")
    results[rank] = smallest_across_ranks(values[rank], torch.device("cpu"))
    torch.distributed.destroy_process_group()


def test_ranks_that_profile_different_free_memory_agree_on_the_smallest_pool():
    """With gpu_memory_utilization each GPU's profiling forward leaves its own pool size; the
    ranks must all allocate the one that fits on every GPU (here over gloo, as the CPU runs it)."""
    import multiprocessing

    from server.engine.tensor_parallel import free_port, smallest_across_ranks

    assert smallest_across_ranks(1234, torch.device("cpu")) == 1234  # alone: its own
    context = multiprocessing.get_context("spawn")
    values, results = [5120, 4096, 4800], context.Manager().dict()
    address = f"tcp://127.0.0.1:{free_port()}"
    ranks = [context.Process(target=_smallest_on_rank, args=(r, address, values, results)) for r in range(3)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(120)
    assert dict(results) == {0: 4096, 1: 4096, 2: 4096}
