"""Test-time scaling beyond s1 in the engine: n samples forked copy-on-write off one prompt
prefill, and adaptive thinking that stops once its probes agree."""

import pytest

from server.answers import majority
from server.engine import AdaptiveThinking, SamplingParams, ThinkBudget
from server.engine.sampler import sample_seed

from ..conftest import random_prompts

PROMPT_LEN = 37  # not a multiple of the block size: the fork copies a partly filled block


def prompt_of(llm, seed: int = 31, length: int = PROMPT_LEN) -> list[int]:
    return random_prompts(1, len(llm.tokenizer), seed=seed, min_len=length, max_len=length)[0]


def test_forked_samples_equal_independent_requests_and_share_one_prefill(llama_dir, make_llm):
    llm = make_llm(llama_dir, block_size=8)
    prompt = prompt_of(llm)
    sampling = SamplingParams(temperature=1.0, top_p=0.95, seed=42, max_tokens=20, ignore_eos=True, n=4)
    before = llm.engine.scheduler.num_scheduled_tokens
    [out] = llm.generate(prompt, sampling)
    computed = llm.engine.scheduler.num_scheduled_tokens - before
    assert [s.index for s in out.samples] == [0, 1, 2, 3] and out.samples[0] is out
    # The prompt is computed once; then each sample computes its own tokens but the last.
    assert computed == PROMPT_LEN + sum(len(s.token_ids) - 1 for s in out.samples)
    alone = [llm.generate(prompt, SamplingParams(temperature=1.0, top_p=0.95, seed=sample_seed(42, i), max_tokens=20,
                                                 ignore_eos=True))[0] for i in range(4)]
    assert [s.token_ids for s in out.samples] == [a.token_ids for a in alone]
    assert len({tuple(s.token_ids) for s in out.samples}) > 1  # different seeds, different samples
    assert sample_seed(42, 0) == 42  # sample 0 is the request without n


def test_n_samples_use_far_less_kv_than_n_requests(llama_dir, make_llm):
    llm = make_llm(llama_dir, block_size=8, enable_prefix_caching=False)
    prompt = prompt_of(llm, length=64)
    engine, bm = llm.engine, llm.engine.block_manager

    def peak_blocks(sampling: SamplingParams, copies: int) -> int:
        for i in range(copies):
            engine.add_request(f"kv-{sampling.n}-{i}", prompt, sampling)
        peak = 0
        while engine.has_unfinished():
            engine.step()
            peak = max(peak, bm.num_blocks - bm.num_free_blocks)
        return peak

    single = peak_blocks(SamplingParams(temperature=1.0, seed=1, max_tokens=16, ignore_eos=True), 1)
    forked = peak_blocks(SamplingParams(temperature=1.0, seed=1, max_tokens=16, ignore_eos=True, n=8), 1)
    assert forked < 8 * single / 2, (forked, single)  # 8 prompt blocks shared, 2-3 own blocks per sample


@pytest.mark.parametrize("aborted", [[2], [0], [0, 1, 2, 3]], ids=["one child", "the parent", "all"])
def test_aborting_samples_frees_exactly_their_blocks(llama_dir, make_llm, aborted):
    llm = make_llm(llama_dir, block_size=8)
    engine = llm.engine
    prompt = prompt_of(llm)
    sampling = SamplingParams(temperature=0.8, seed=7, max_tokens=24, ignore_eos=True, n=4)
    engine.add_request("group", prompt, sampling)
    outputs: dict[int, list[int]] = {i: [] for i in range(4)}
    for _ in range(5):
        for delta in engine.step():
            outputs[delta.index] += delta.new_token_ids
    for index in aborted:
        [delta] = engine.abort("group", index)
        assert delta.finish_reason == "abort" and delta.index == index
    while engine.has_unfinished():
        for delta in engine.step():
            outputs[delta.index] += delta.new_token_ids
    survivors = [i for i in range(4) if i not in aborted]
    alone = {i: llm.generate(prompt, SamplingParams(temperature=0.8, seed=sample_seed(7, i), max_tokens=24,
                                                    ignore_eos=True))[0].token_ids for i in survivors}
    assert {i: outputs[i] for i in survivors} == alone  # the others never noticed
    assert all(len(outputs[i]) < 24 for i in aborted)
    # make_llm checks every block is free and every reference count is zero afterwards


def test_majority_vote_groups_equivalent_answers_and_breaks_ties_by_the_first_sample():
    vote = majority(["so \\boxed{1/2}", "Answer: 0.5", "\\boxed{3}", "Final answer: 3", "no idea"], "math")
    assert (vote.answer, vote.count) == ("1/2", 2)  # 1/2 == 0.5 first; 3 ties with it and came later
    assert vote.answers == ["1/2", "0.5", "3", "3", "no idea"]
    mc = majority(["The answer is (B)", "I pick C", "answer: b", "(C)"], "multiple_choice")
    assert (mc.answer, mc.count) == ("B", 2)
    normalized = majority(["Answer: The Eiffel Tower.", "answer: eiffel tower", "Answer: Louvre"], "normalized")
    assert (normalized.answer, normalized.count) == ("eiffel tower", 2)
    assert majority(["", "   "], "exact").count == 0
    # A forced "Final Answer:" the model left empty is no answer (it must not win the vote).
    empty = majority(["\nFinal Answer:", "\nFinal Answer:", "\nFinal Answer: 391"], "math")
    assert (empty.answer, empty.count, empty.answers) == ("391", 1, ["", "", "391"])


def adaptive_request(llm, adaptive: AdaptiveThinking | None, max_think: int, bias: dict):
    prompt = prompt_of(llm, seed=33, length=20)
    sampling = SamplingParams(temperature=0, max_tokens=max_think + 64, logit_bias=bias)
    return llm.generate(prompt, sampling, ThinkBudget(max_think=max_think, adaptive=adaptive))[0]


def test_adaptive_thinking_stops_where_its_probes_first_agree(model_dir, make_llm):
    llm = make_llm(model_dir, block_size=8)
    seven = llm.tokenizer.encode("7", add_special_tokens=False)[0]
    bias = {seven: 30.0}  # every probe answers "7...": the answers agree from the first probe on
    adaptive = AdaptiveThinking(every=8, agree=3, probe_tokens=6)
    out = adaptive_request(llm, adaptive, max_think=80, bias=bias)
    plain = adaptive_request(llm, None, max_think=80, bias=bias)
    assert out.converged and out.think_end_forced and "THINK_CONVERGED" in out.events
    assert out.think_tokens == 8 * 3  # the third probe, at 24 thinking tokens, made three agree
    assert out.num_probes == 3 and out.probe_tokens == 3 * 6
    # Up to the stop the sequence is the request without probes (its K/V were never touched).
    assert out.token_ids[: out.think_tokens] == plain.token_ids[: out.think_tokens]
    assert not plain.converged and plain.think_tokens == 80


def test_adaptive_thinking_never_thinks_past_max_think(model_dir, make_llm):
    llm = make_llm(model_dir, block_size=8)
    engine = llm.engine
    keep_thinking = {t: -100.0 for t in (engine.think_ids.think_end[0], *engine.eos_token_ids)}
    # Probes that must agree 50 times cannot within 40 tokens: max_think still cuts.
    out = adaptive_request(llm, AdaptiveThinking(every=4, agree=50, probe_tokens=4), max_think=40, bias=keep_thinking)
    assert not out.converged and out.think_tokens == 40 and out.num_probes == 9  # at 4, 8, ..., 36
    assert out.probe_tokens <= 9 * 4
