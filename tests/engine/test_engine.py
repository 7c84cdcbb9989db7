"""End-to-end engine behaviour on a tiny random-weight model: caching, sampling, stops, errors."""

import pytest

from server.engine import (
    EmptyPromptError,
    InvalidRequestError,
    InvalidSamplingParamError,
    PromptTooLongError,
    SamplingParams,
)
from tests.conftest import EXTRA_EMBEDDING_ROWS, random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=16)


@pytest.fixture
def vocab(llama_dir):
    from server.models import ModelConfig

    return ModelConfig.from_model_dir(llama_dir).vocab_size - EXTRA_EMBEDDING_ROWS


def test_shared_prefixes_hit_the_cache_and_change_nothing(llama_dir, make_llm, vocab):
    prefix = random_prompts(1, vocab, seed=1, min_len=64, max_len=64)[0]
    prompts = [prefix + tail for tail in random_prompts(8, vocab, seed=2, max_len=20)]
    uncached = make_llm(llama_dir, enable_prefix_caching=False).generate(prompts, GREEDY)

    llm = make_llm(llama_dir)
    llm.generate(prompts[:1], GREEDY)  # warm the cache with the shared prefix
    cached = llm.generate(prompts, GREEDY)
    bm = llm.engine.block_manager
    assert bm.prefix_hit_tokens >= 7 * 64
    assert all(out.num_cached_tokens >= 64 for out in cached)
    assert [o.token_ids for o in cached] == [o.token_ids for o in uncached]


def test_same_seed_same_output_whatever_the_batch(llama_dir, make_llm, vocab):
    prompts = random_prompts(6, vocab, seed=3)
    sampling = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=1234, max_tokens=20)
    llm = make_llm(llama_dir)
    alone = llm.generate(prompts[0], sampling)[0]
    in_batch = llm.generate(prompts, [sampling] + [SamplingParams(temperature=1.0, max_tokens=30)] * 5)[0]
    assert alone.token_ids == in_batch.token_ids
    other_seed = llm.generate(prompts[0], SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=99, max_tokens=20))[0]
    assert other_seed.token_ids != alone.token_ids


def test_seeded_sampling_survives_preemption(llama_dir, make_llm, vocab):
    prompts = random_prompts(12, vocab, seed=4, min_len=40, max_len=80)
    samplings = [SamplingParams(temperature=1.0, seed=i, max_tokens=24) for i in range(12)]
    roomy = make_llm(llama_dir).generate(prompts, samplings)
    tight_llm = make_llm(llama_dir, block_size=8, num_kv_blocks=20)
    tight = tight_llm.generate(prompts, samplings)
    assert tight_llm.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in tight] == [o.token_ids for o in roomy]


def test_top_k_one_is_greedy(llama_dir, make_llm, vocab):
    prompts = random_prompts(4, vocab, seed=5)
    llm = make_llm(llama_dir)
    greedy = llm.generate(prompts, GREEDY)
    top1 = llm.generate(prompts, SamplingParams(temperature=1.5, top_k=1, max_tokens=16))
    assert [o.token_ids for o in top1] == [o.token_ids for o in greedy]


def test_logit_bias_forces_a_token(llama_dir, make_llm, vocab):
    llm = make_llm(llama_dir)
    out = llm.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=5, logit_bias={42: 100}))[0]
    assert out.token_ids == [42] * 5


def test_unknown_token_ids_detokenize_to_nothing(llama_dir, make_llm, vocab):
    llm = make_llm(llama_dir)
    unknown = vocab + 3  # an embedding row the tokenizer has no token for
    out = llm.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=4, logit_bias={unknown: 100}))[0]
    assert out.token_ids == [unknown] * 4 and out.text == ""


def test_text_is_the_decoded_tokens(llama_dir, make_llm):
    llm = make_llm(llama_dir)
    prompts = ["The quick brown fox", "héllo wörld 你好", "What is 2+3?"]
    for out in llm.generate(prompts, SamplingParams(temperature=1.0, seed=0, max_tokens=40)):
        known = [t for t in out.token_ids if t < len(llm.tokenizer)]
        assert out.text == llm.tokenizer.decode(known, skip_special_tokens=True)


def test_stop_string_ends_generation_and_is_cut(llama_dir, make_llm, vocab):
    llm = make_llm(llama_dir)
    prompt = random_prompts(1, vocab, seed=6)[0]
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0]
    assert len(free.text) > 6
    stop = free.text[3:6]
    stopped = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, stop=[stop], ignore_eos=True))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.index(stop)]
    assert free.token_ids[: len(stopped.token_ids)] == stopped.token_ids


def test_stop_token_ids_and_max_tokens(llama_dir, make_llm, vocab):
    llm = make_llm(llama_dir)
    prompt = random_prompts(1, vocab, seed=8)[0]
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    assert len(free.token_ids) == 12 and free.finish_reason == "length"
    target = free.token_ids[4]
    first = free.token_ids.index(target)
    stopped = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[target]))[0]
    assert stopped.token_ids == free.token_ids[: first + 1] and stopped.finish_reason == "stop"


def test_eos_stops_unless_ignored(llama_dir, make_llm):
    llm = make_llm(llama_dir)
    eos = llm.tokenizer.eos_token_id
    force_eos = SamplingParams(temperature=0, max_tokens=8, logit_bias={eos: 100})
    assert llm.generate([1, 2, 3], force_eos)[0].token_ids == [eos]
    ignored = SamplingParams(temperature=0, max_tokens=8, logit_bias={eos: 100}, ignore_eos=True)
    out = llm.generate([1, 2, 3], ignored)[0]
    assert out.token_ids == [eos] * 8 and out.finish_reason == "length"


def test_generation_stops_at_the_model_context(llama_dir, make_llm):
    llm = make_llm(llama_dir, max_model_len=32)
    out = llm.generate(list(range(1, 25)), SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[0]
    assert len(out.token_ids) == 8 and out.finish_reason == "length"


@pytest.mark.parametrize(
    "make_bad, error, field",
    [
        (lambda: ("", GREEDY), EmptyPromptError, "prompt"),
        (lambda: ([], GREEDY), EmptyPromptError, "prompt"),
        (lambda: ([5] * 600, GREEDY), PromptTooLongError, "prompt"),
        (lambda: ([1, 2, 10**6], GREEDY), InvalidRequestError, "prompt"),
        (lambda: ("hi", SamplingParams(max_tokens=0)), InvalidSamplingParamError, "max_tokens"),
        (lambda: ("hi", SamplingParams(top_p=0)), InvalidSamplingParamError, "top_p"),
        (lambda: ("hi", SamplingParams(top_p=1.5)), InvalidSamplingParamError, "top_p"),
        (lambda: ("hi", SamplingParams(temperature=-0.1)), InvalidSamplingParamError, "temperature"),
        (lambda: ("hi", SamplingParams(top_k=-1)), InvalidSamplingParamError, "top_k"),
        (lambda: ("hi", SamplingParams(logit_bias={10**6: 1.0})), InvalidSamplingParamError, "logit_bias"),
        (lambda: ("hi", SamplingParams(stop_token_ids=[10**6])), InvalidSamplingParamError, "stop_token_ids"),
    ],
)
def test_bad_input_is_rejected_before_scheduling(llama_dir, make_llm, make_bad, error, field):
    llm = make_llm(llama_dir)
    with pytest.raises(error) as info:
        prompt, sampling = make_bad()
        llm.generate(["a fine prompt", prompt], sampling)
    assert info.value.field == field
    assert not llm.engine.has_unfinished()  # the good prompt was not left half-scheduled
    assert llm.generate("still serving", GREEDY)[0].finish_reason in ("stop", "length")


def test_prompt_longer_than_the_kv_pool_is_rejected(llama_dir, make_llm):
    llm = make_llm(llama_dir, block_size=4, num_kv_blocks=8)
    with pytest.raises(PromptTooLongError, match="KV cache pool"):
        llm.generate(list(range(1, 40)), GREEDY)
