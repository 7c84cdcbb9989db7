"""Budget forcing in the decode loop, pinned token for token against the s1 loop on transformers
(tests/engine/budget_reference.py), plus its invariants and its input validation."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.engine import InvalidRequestError, SamplingParams, ThinkBudget, ThinkTemplate
from server.errors import InvalidConfigError
from server.engine.think import THINK_TEMPLATES

from ..conftest import hf_greedy, hf_model, random_prompts
from .budget_reference import s1_reference

MAX_TOKENS = 96
BIAS = 2.0  # on the delimiter's first token: the random model really tries to stop thinking

BUDGETS = [
    ThinkBudget(min_think=20),
    ThinkBudget(min_think=40, max_waits=2),
    ThinkBudget(min_think=30, max_waits=1),
    ThinkBudget(max_think=8),
    ThinkBudget(max_think=25),
    ThinkBudget(min_think=10, max_think=15),
    ThinkBudget(min_think=30, max_think=30),
    ThinkBudget(min_think=35, max_think=50, max_waits=3),
    ThinkBudget(min_think=12, max_think=40, wait=" hmm, wait"),
    ThinkBudget(min_think=25, max_think=26, wait="Wait Wait Wait"),
    ThinkBudget(min_think=69),  # thinking cut where max_tokens leaves the answer its minimum room
    ThinkBudget(),  # phases tracked; cut only to leave the answer room
    ThinkBudget(max_think=1),
    ThinkBudget(min_think=3, max_waits=5),
]


def test_greedy_output_equals_the_s1_loop_on_transformers(make_llm, model_dir):
    llm = make_llm(model_dir, num_kv_blocks=256, block_size=8)
    engine = llm.engine
    think, eos = engine.think_ids, engine.eos_token_ids
    bias = {think.think_end[0]: BIAS}
    vocab = len(llm.tokenizer)
    prompts = random_prompts(len(BUDGETS) + 4, vocab, seed=11, max_len=40)
    budgets = BUDGETS + [None] * 4  # unbudgeted requests share the batch
    sampling = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logit_bias=bias)
    outputs = llm.generate(prompts, sampling, budgets)

    model = hf_model(model_dir)
    for prompt, budget, out in zip(prompts, budgets, outputs):
        if budget is None:
            assert out.think_tokens == 0 and out.answer_text == out.text
            continue
        wait = tuple(llm.tokenizer.encode(budget.wait, add_special_tokens=False)) if budget.wait else think.wait
        ref = s1_reference(model, prompt + list(think.think_start), think, budget, wait, MAX_TOKENS, eos, bias,
                           engine.config.min_answer_tokens)
        assert out.prompt_token_ids[-len(think.think_start) :] == list(think.think_start)
        assert out.token_ids == ref["token_ids"], budget
        assert (out.think_tokens, out.num_waits, out.think_end_forced) == (
            ref["think_tokens"], ref["num_waits"], ref["forced"]
        ), budget
    # The batch exercised every path: Waits, forced ends and the model's own ends.
    assert sum(o.num_waits for o in outputs) >= 5
    assert sum(o.think_end_forced for o in outputs) >= 3
    assert any(b is not None and not o.think_end_forced and o.answer_tokens for b, o in zip(budgets, outputs))


def test_unbudgeted_requests_match_transformers_next_to_budgeted_ones(make_llm, llama_dir):
    llm = make_llm(llama_dir, num_kv_blocks=256)
    prompts = random_prompts(6, len(llm.tokenizer), seed=5, max_len=30)
    budgets = [ThinkBudget(min_think=20, max_waits=4), None] * 3
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=48), budgets)
    expected = hf_greedy(llama_dir, prompts[1::2], 48)
    assert [o.token_ids for o in outputs[1::2]] == expected


def test_phases_split_the_text_and_events_mark_what_the_engine_did(make_llm, llama_dir):
    llm = make_llm(llama_dir, num_kv_blocks=128)
    think = llm.engine.think_ids
    sampling = SamplingParams(temperature=0, max_tokens=40, logit_bias={think.think_end[0]: 100.0})
    [out] = llm.generate("Question: 2+2?", sampling, ThinkBudget(min_think=3, max_think=10, wait=" Wait"))
    # The delimiter is always the most likely token: Waits until min_think, then the model's own end.
    assert out.num_waits >= 1 and out.events[: out.num_waits] == ["WAIT_INSERTED"] * out.num_waits
    assert out.think_text == " Wait" * out.num_waits
    gen = out.token_ids
    assert gen[out.think_tokens : out.think_tokens + len(think.think_end)] == list(think.think_end)
    assert out.answer_tokens == len(gen) - out.think_tokens - len(think.think_end)

    [forced] = llm.generate("Question: 2+2?", SamplingParams(temperature=0, max_tokens=40), ThinkBudget(max_think=5))
    assert forced.think_end_forced and forced.events == ["THINK_END_FORCED"] and forced.think_tokens == 5
    tail = forced.token_ids[5 : 5 + len(think.think_end) + len(think.answer_prefix)]
    assert tail == list(think.think_end + think.answer_prefix)
    assert forced.answer_text.startswith(THINK_TEMPLATES["s1"].answer_prefix)
    assert forced.text.startswith(forced.think_text) and forced.text.endswith(forced.answer_text)


def test_budgeted_outputs_survive_preemption_and_prefix_caching(make_llm, llama_dir):
    prompts = random_prompts(8, 400, seed=9, min_len=20, max_len=40)
    prompts = [prompts[0][:16] + p for p in prompts]  # a shared prefix for the cache
    sampling = SamplingParams(temperature=0, max_tokens=60, logit_bias={1: BIAS})
    budgets = [ThinkBudget(min_think=20, max_think=30, max_waits=3)] * 8
    roomy = make_llm(llama_dir, num_kv_blocks=512, enable_prefix_caching=False).generate(prompts, sampling, budgets)
    tight_llm = make_llm(llama_dir, num_kv_blocks=24, block_size=8)
    tight = tight_llm.generate(prompts, sampling, budgets)
    assert tight_llm.engine.scheduler.num_preemptions > 0
    assert tight_llm.engine.block_manager.prefix_hit_tokens > 0
    assert [o.token_ids for o in tight] == [o.token_ids for o in roomy]
    assert [o.num_waits for o in tight] == [o.num_waits for o in roomy]


def test_seeded_sampling_with_budgets_is_reproducible_whatever_the_batch(make_llm, llama_dir):
    llm = make_llm(llama_dir, num_kv_blocks=256)
    prompts = random_prompts(4, 400, seed=2, max_len=20)
    sampling = SamplingParams(temperature=1.0, top_p=0.9, seed=123, max_tokens=56, logit_bias={1: BIAS})
    budget = ThinkBudget(min_think=15, max_think=25)
    together = llm.generate(prompts, sampling, budget)
    alone = [llm.generate([p], sampling, budget)[0] for p in prompts]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_budgeted_request_is_refused_naming_a_field_or_reaches_an_answer_with_room(make_llm, llama_dir, data):
    """Every combination of max_tokens (set or not), max_think, min_think and max_waits."""
    llm = make_llm(llama_dir, num_kv_blocks=256, max_model_len=160, default_max_tokens=24)
    engine = llm.engine
    think = engine.think_ids
    min_answer = engine.config.min_answer_tokens
    optional = lambda hi: st.one_of(st.none(), st.integers(0, hi))  # noqa: E731
    n = data.draw(st.integers(1, 5))
    budgets = []
    for _ in range(n):
        if data.draw(st.booleans()):
            budgets.append(None)
            continue
        lo, hi = data.draw(optional(90)), data.draw(optional(90))
        if lo and hi and lo > hi:
            lo, hi = hi, lo
        budgets.append(ThinkBudget(min_think=lo, max_think=hi, max_waits=data.draw(optional(4))))
    max_tokens = data.draw(st.one_of(st.none(), st.integers(1, 120)))
    prompts = random_prompts(n, 400, seed=data.draw(st.integers(0, 1000)), max_len=30)
    bias = {think.think_end[0]: data.draw(st.sampled_from([0.0, 2.0, 5.0]))}
    sampling = SamplingParams(temperature=0, max_tokens=max_tokens, logit_bias=bias)
    for prompt, budget in zip(prompts, budgets):
        try:
            [out] = llm.generate([prompt], sampling, budget)
        except InvalidRequestError as err:
            assert budget is not None
            assert err.field in ("max_think", "min_think", "max_tokens", "prompt")
            continue
        limit = max_tokens or (engine.config.default_max_tokens if budget is None else None)
        if limit is not None:
            assert len(out.token_ids) <= limit
        if budget is None:
            assert out.token_ids == llm.generate([prompt], sampling)[0].token_ids  # as when run alone
            continue
        assert out.think_tokens <= (budget.max_think or out.think_tokens)
        assert out.num_waits <= (budget.max_waits or out.num_waits)
        # The answer phase was reached, with room: it ended by itself (EOS) or had min_answer tokens.
        delimiter = len(think.think_end)
        assert out.think_tokens + delimiter + out.answer_tokens == len(out.token_ids), "a token counted twice or not at all"
        assert out.answer_tokens >= 1
        if out.finish_reason == "length":
            prefix = len(think.answer_prefix) if out.think_end_forced else 0
            assert out.answer_tokens - prefix >= min_answer
        if budget.min_think and out.think_tokens < budget.min_think:
            assert out.num_waits == budget.max_waits  # only running out of Waits ends thinking early


@pytest.mark.parametrize(
    "budget,field",
    [
        (lambda: ThinkBudget(min_think=-1), "min_think"),
        (lambda: ThinkBudget(max_think=-5), "max_think"),
        (lambda: ThinkBudget(max_waits=-1), "max_waits"),
        (lambda: ThinkBudget(min_think=10, max_think=5), "min_think"),
        (lambda: ThinkBudget(wait=""), "wait"),
    ],
)
def test_bad_budgets_are_rejected_naming_the_field(budget, field):
    with pytest.raises(InvalidRequestError) as err:
        budget()
    assert err.value.field == field


def test_budgets_that_do_not_fit_the_model_are_rejected_before_scheduling(make_llm, llama_dir):
    llm = make_llm(llama_dir, num_kv_blocks=64, max_model_len=128)
    with pytest.raises(InvalidRequestError) as err:
        llm.generate("hello", SamplingParams(), ThinkBudget(max_think=500))
    assert err.value.field == "max_think"
    with pytest.raises(InvalidRequestError) as err:
        llm.generate("hello", SamplingParams(), ThinkBudget(min_think=5, wait="<|im_start|>"))
    assert err.value.field == "wait"
    assert not llm.engine.has_unfinished()


def test_the_think_opener_is_appended_once(make_llm, llama_dir):
    llm = make_llm(llama_dir, num_kv_blocks=64)
    start = THINK_TEMPLATES["s1"].think_start
    budget, sampling = ThinkBudget(max_think=2), SamplingParams(temperature=0, max_tokens=40)
    plain, opened, s1_style = llm.generate(["Hi", "Hi" + start, "Hi" + start.rstrip()], sampling, budget)
    assert plain.prompt_token_ids == opened.prompt_token_ids == s1_style.prompt_token_ids
    ids = llm.tokenizer("Hi").input_ids
    [from_ids] = llm.generate([ids], sampling, budget)
    assert from_ids.prompt_token_ids == plain.prompt_token_ids


def test_templates_are_chosen_by_name_object_or_tokenizer_and_checked_at_start_up(make_llm, llama_dir):
    assert make_llm(llama_dir, num_kv_blocks=8).engine.think_template.name == "s1"  # ChatML vocabulary
    custom = ThinkTemplate("mine", "<|im_start|>", "<|endoftext|>", " So:", "Hmm")
    llm = make_llm(llama_dir, num_kv_blocks=64, think_template=custom)
    [out] = llm.generate("Hi", SamplingParams(temperature=0, max_tokens=40), ThinkBudget(max_think=3))
    assert llm.tokenizer.decode(out.token_ids[3:4]) == "<|endoftext|>"
    # A delimiter that does not start with a token of its own cannot be caught: refused at start-up.
    for template in ("r1", ThinkTemplate("slash", "<|im_start|>", "</think>", " So:")):
        with pytest.raises(InvalidConfigError, match="no token of its own"):
            make_llm(llama_dir, num_kv_blocks=8, think_template=template)
    with pytest.raises(InvalidConfigError, match="starts with the delimiter"):
        make_llm(llama_dir, num_kv_blocks=8, think_template=ThinkTemplate("w", "<|im_start|>", "<|endoftext|>", "", "<|endoftext|>"))


def test_chat_requests_get_the_think_opener_only_when_budgeted(make_llm, llama_dir):
    llm = make_llm(llama_dir, num_kv_blocks=64)
    messages = [{"role": "user", "content": "2+2?"}]
    sampling = SamplingParams(temperature=0, max_tokens=40)
    [plain] = llm.chat(messages, sampling)
    [budgeted] = llm.chat(messages, sampling, ThinkBudget(max_think=4))
    own = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert plain.prompt_token_ids == own
    assert budgeted.prompt_token_ids == own + list(llm.engine.think_ids.think_start)
