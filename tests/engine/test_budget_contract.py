"""The thinking-budget contract (README "Thinking budgets"): phases own their text, stops belong to
the answer, a budgeted request always answers or is refused naming the field, chat prompts are
the model's own token ids; and the budget bugs peers shipped, each pinned."""

import pytest

from server.engine import InvalidRequestError, SamplingParams, ThinkBudget

from ..conftest import BOS_CHAT_TEMPLATE, QWEN3_CHAT_TEMPLATE, R1_CHAT_TEMPLATE, build_tiny_model, build_tokenizer

PREFIX = "\nFinal Answer:"  # what the s1 template forces at the cut
NO_END = -100.0  # a logit bias that keeps the model from ending thinking by itself


@pytest.fixture
def llm(make_llm, llama_dir):
    return make_llm(llama_dir, num_kv_blocks=128, block_size=8)


def never_ends(llm, **more) -> dict[int, float]:
    """A logit bias with which the random model never ends thinking (nor answering) by itself."""
    return {llm.engine.think_ids.think_end[0]: NO_END, **{e: NO_END for e in llm.engine.eos_token_ids}, **more}


# ---- phases own their text; stops belong to the answer -------------------------------------------
def test_a_stop_string_never_matches_the_forced_answer_prefix(llm):
    sampling = SamplingParams(temperature=0, max_tokens=60, stop=["\n", "Answer:"], logit_bias=never_ends(llm))
    [out] = llm.generate("Is 7 prime?", sampling, ThinkBudget(max_think=8))
    assert out.think_end_forced and out.think_tokens == 8
    assert out.answer_text.startswith(PREFIX)  # "\n" and "Answer:" are both in it: forced, so not matched
    sampled = out.answer_text[len(PREFIX):]
    assert "\n" not in sampled and "Answer:" not in sampled
    assert out.text == out.think_text + "<|im_start|>answer" + out.answer_text  # the delimiter as the model writes it


def test_a_stop_string_in_the_thinking_does_not_end_the_request_and_cuts_only_the_answer(llm):
    prompt, budget = "Is 7 prime?", ThinkBudget(max_think=30)
    sampling = SamplingParams(temperature=0, max_tokens=80, logit_bias=never_ends(llm))
    [free] = llm.generate(prompt, sampling)  # unbudgeted run, to pick stop strings from
    [ref] = llm.generate(prompt, sampling, budget)
    sampled_answer = ref.answer_text[len(PREFIX):]
    stop = next(ref.think_text[i : i + 2] for i in range(len(ref.think_text) - 1)
                if ref.think_text[i : i + 2] not in sampled_answer and ref.think_text[i : i + 2].strip())
    cut = sampled_answer[len(sampled_answer) // 2 :][:2]
    [out] = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=80, logit_bias=never_ends(llm), stop=[stop, cut]), budget)
    assert out.think_text == ref.think_text and stop in out.think_text  # thinking untouched by the stop
    expected = ref.answer_text[: len(PREFIX) + sampled_answer.index(cut)]
    assert out.answer_text == expected and out.finish_reason == "stop"
    assert free.text  # (the unbudgeted run generated text at all)


def test_stop_token_ids_match_only_tokens_sampled_in_the_answer(llm):
    think = llm.engine.think_ids
    prompt, budget = "Count to three.", ThinkBudget(max_think=12)
    sampling = SamplingParams(temperature=0, max_tokens=60, logit_bias=never_ends(llm))
    [ref] = llm.generate(prompt, sampling, budget)
    answer_start = ref.think_tokens + len(think.think_end)
    sampled_answer = [t for t, f in zip(ref.token_ids[answer_start:], ref.forced[answer_start:]) if not f]
    # a token of the forced prefix, one the model sampled while thinking, and one it samples in the answer
    in_thinking = next(t for t in ref.token_ids[:12] if t not in sampled_answer)
    target = sampled_answer[3]
    stops = (think.answer_prefix[-1], in_thinking, target)
    [out] = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=60, logit_bias=never_ends(llm), stop_token_ids=stops), budget)
    end = answer_start + len(think.answer_prefix) + sampled_answer.index(target) + 1
    assert out.token_ids == ref.token_ids[:end] and out.finish_reason == "stop"


def test_every_token_is_flagged_sampled_or_forced(llm):
    think = llm.engine.think_ids
    bias = {think.think_end[0]: 100.0}  # the model always tries to stop: Waits, then its own end
    [out] = llm.generate("Hi", SamplingParams(temperature=0, max_tokens=60, logit_bias=bias), ThinkBudget(min_think=4, max_waits=2))
    wait = len(think.wait)
    assert out.num_waits == 2 and out.forced[: 2 * wait] == [True] * (2 * wait)
    delimiter = out.forced[out.think_tokens : out.think_tokens + len(think.think_end)]
    assert delimiter == [False] + [True] * (len(think.think_end) - 1)  # the model's first token, the rest completed
    assert not any(out.forced[out.think_tokens + len(think.think_end):])


# ---- a budgeted request always gets its answer ---------------------------------------------------
def test_max_think_beyond_max_tokens_or_the_context_is_refused_naming_the_field(make_llm, llama_dir):
    llm = make_llm(llama_dir, num_kv_blocks=64, max_model_len=128)
    reserve = len(llm.engine.think_ids.think_end + llm.engine.think_ids.answer_prefix) + llm.engine.config.min_answer_tokens
    for max_think, max_tokens in ((70, 64), (64 - reserve + 1, 64)):
        with pytest.raises(InvalidRequestError, match="max_tokens") as err:
            llm.generate("hello", SamplingParams(max_tokens=max_tokens), ThinkBudget(max_think=max_think))
        assert err.value.field == "max_think"
    prompt = llm.tokenizer("hello").input_ids
    room = 128 - len(prompt) - len(llm.engine.think_ids.think_start)
    with pytest.raises(InvalidRequestError, match="context") as err:  # all the room left: no answer
        llm.generate([prompt], SamplingParams(), ThinkBudget(max_think=room))
    assert err.value.field == "max_think"
    with pytest.raises(InvalidRequestError) as err:
        llm.generate("hello", SamplingParams(max_tokens=100), ThinkBudget(min_think=100 - reserve + 1))
    assert err.value.field == "min_think"
    with pytest.raises(InvalidRequestError) as err:
        llm.generate("hello", SamplingParams(max_tokens=reserve), ThinkBudget())
    assert err.value.field == "max_tokens"
    [out] = llm.generate("hello", SamplingParams(temperature=0, max_tokens=reserve + 1), ThinkBudget())  # the least that fits
    assert out.think_tokens == 1 and out.answer_tokens >= 1


def test_unset_max_tokens_leaves_the_answer_default_max_tokens(make_llm, llama_dir):
    llm = make_llm(llama_dir, num_kv_blocks=128, block_size=8, default_max_tokens=20)
    think = llm.engine.think_ids
    sampling = SamplingParams(temperature=0, logit_bias=never_ends(llm))
    forced, alone = llm.generate(["Hi", "Hi"], sampling, [ThinkBudget(max_think=50), ThinkBudget(min_think=10)])
    assert forced.think_tokens == 50 and forced.answer_tokens == len(think.answer_prefix) + 20
    # min_think alone: thinking is cut at default_max_tokens, and the answer still has its room.
    assert alone.think_end_forced and alone.think_tokens == 20 and alone.answer_tokens == len(think.answer_prefix) + 20
    assert all(o.finish_reason == "length" for o in (forced, alone))


def test_thinking_toward_the_end_of_the_context_is_cut_so_the_answer_fits(make_llm, llama_dir):
    llm = make_llm(llama_dir, num_kv_blocks=64, max_model_len=100, default_max_tokens=500)
    prompt = llm.tokenizer("Why is the sky blue? " * 4).input_ids
    [out] = llm.generate([prompt], SamplingParams(temperature=0, logit_bias=never_ends(llm)), ThinkBudget(min_think=5))
    assert out.think_end_forced and out.finish_reason == "length"
    assert len(out.prompt_token_ids) + len(out.token_ids) == 100
    assert out.answer_tokens - len(llm.engine.think_ids.answer_prefix) == llm.engine.config.min_answer_tokens


def test_a_request_may_set_the_text_forced_at_the_cut(llm):
    sampling = SamplingParams(temperature=0, max_tokens=40, logit_bias=never_ends(llm))
    own, bare = llm.generate(["Hi", "Hi"], sampling, [ThinkBudget(max_think=3, answer_prefix=" So:"), ThinkBudget(max_think=3, answer_prefix="")])
    assert own.answer_text.startswith(" So:") and not bare.answer_text.startswith(PREFIX)
    assert bare.token_ids[3 : 3 + len(llm.engine.think_ids.think_end)] == list(llm.engine.think_ids.think_end)
    assert sum(bare.forced) == len(llm.engine.think_ids.think_end)


# ---- the bug classes peers shipped ---------------------------------------------------------------
@pytest.mark.parametrize("budget,tries_to_stop", [
    (ThinkBudget(min_think=1, max_think=1, wait="Wait Wait Wait"), True),  # a multi-token Wait at budget 1
    (ThinkBudget(min_think=2, max_think=2, wait="Wait Wait Wait"), True),
    (ThinkBudget(min_think=1, max_think=3, wait="Wait Wait Wait"), True),
    (ThinkBudget(max_think=1), False),
])
def test_the_budget_is_never_exceeded_by_a_multi_token_wait(llm, budget, tries_to_stop):
    think = llm.engine.think_ids
    # Trying to stop at once makes a Wait due at the first token; otherwise the budget cuts.
    bias = {think.think_end[0]: 100.0} if tries_to_stop else never_ends(llm)
    [out] = llm.generate("Hi", SamplingParams(temperature=0, max_tokens=60, logit_bias=bias), budget)
    assert out.think_tokens == budget.max_think and out.think_end_forced
    assert out.token_ids[budget.max_think : budget.max_think + len(think.think_end)] == list(think.think_end)


def test_budget_zero_means_no_constraint(llm):
    sampling = SamplingParams(temperature=0, max_tokens=60, logit_bias=never_ends(llm))
    zero, unset = llm.generate(["Hi", "Hi"], sampling, [ThinkBudget(min_think=0, max_think=0, max_waits=0), ThinkBudget()])
    assert zero.token_ids == unset.token_ids and zero.num_waits == 0


def test_thinking_already_in_the_prompt_is_not_counted_and_not_reopened(llm):
    think = llm.engine.think_ids
    partial = "Is 7 prime?<|im_start|>think\nLet me see"  # a partial assistant turn with thinking written
    [out] = llm.generate(partial, SamplingParams(temperature=0, max_tokens=60, logit_bias=never_ends(llm)), ThinkBudget(max_think=6))
    assert out.prompt_token_ids == llm.tokenizer(partial).input_ids  # no second opener
    assert out.think_tokens == 6 and out.token_ids[6 : 6 + len(think.think_end)] == list(think.think_end)


def test_a_think_opener_in_the_answer_phase_does_not_rearm_thinking(make_llm, qwen3_dir):
    llm = make_llm(qwen3_dir, num_kv_blocks=64)
    think = llm.engine.think_ids
    opener = think.think_start[0]  # `<think>`
    sampling = SamplingParams(temperature=0, max_tokens=50, logit_bias={opener: 100.0, think.think_end[0]: NO_END})
    [out] = llm.generate("Hi", sampling, ThinkBudget(min_think=2, max_think=3))
    answer = out.token_ids[3 + len(think.think_end) + len(think.answer_prefix):]
    assert answer and set(answer) == {opener}  # the model keeps writing <think>: it stays answer text
    assert out.think_tokens == 3 and out.num_waits == 0 and out.events == ["THINK_END_FORCED"]
    assert out.answer_text.endswith("<think>" * 3)


def test_the_delimiter_is_completed_once_and_a_natural_end_is_counted_once(llm):
    think = llm.engine.think_ids
    assert len(think.think_end) > 1  # `<|im_start|>answer`: the engine completes what the model starts
    bias = {think.think_end[0]: 4.0}
    outs = llm.generate([f"Question {i}?" for i in range(8)], SamplingParams(temperature=0, max_tokens=60, logit_bias=bias),
                        ThinkBudget(min_think=3, max_waits=1))
    natural = [o for o in outs if not o.think_end_forced]
    assert natural
    for out in natural:
        end = out.think_tokens + len(think.think_end)
        assert out.token_ids[out.think_tokens : end] == list(think.think_end)
        assert out.token_ids[end : end + len(think.think_end) - 1] != list(think.think_end[1:])  # not restarted
        assert out.think_tokens + len(think.think_end) + out.answer_tokens == len(out.token_ids)
        assert out.events == ["WAIT_INSERTED"] * out.num_waits


# ---- chat prompts equal the model's own --------------------------------------------------------------
CHATS = {  # name: (model arch, chat template, think tokens, bos, chat_template_kwargs, opens thinking)
    "llama_writes_bos": ("llama", BOS_CHAT_TEMPLATE, False, True, None, False),
    "qwen2": ("qwen2", None, False, False, None, False),
    "qwen3_thinking": ("qwen3", QWEN3_CHAT_TEMPLATE, True, False, {"enable_thinking": True}, False),
    "qwen3_no_thinking": ("qwen3", QWEN3_CHAT_TEMPLATE, True, False, {"enable_thinking": False}, None),
    "r1_opens_thinking": ("qwen2", R1_CHAT_TEMPLATE, True, False, None, True),
}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"}]


@pytest.fixture(scope="module")
def chat_models(tmp_path_factory) -> dict:
    built = {}
    for name, (arch, template, think_tokens, bos, _, _) in CHATS.items():
        tokenizer = build_tokenizer(template, think_tokens=think_tokens, bos=bos) if template else None
        built[name] = build_tiny_model(tmp_path_factory.mktemp(name), arch, tokenizer=tokenizer)
    return built


@pytest.mark.parametrize("name", CHATS)
def test_chat_prompt_ids_equal_apply_chat_template_and_what_the_trainer_feeds(make_llm, chat_models, name):
    from trainer.config import TrainConfig
    from trainer.data import make_renderer

    _, _, _, bos, kwargs, opens = CHATS[name]
    llm = make_llm(chat_models[name], num_kv_blocks=64)
    tokenizer = llm.tokenizer
    own = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True, **(kwargs or {}))["input_ids"]
    if bos:
        assert own.count(tokenizer.bos_token_id) == 1
    sampling = SamplingParams(temperature=0, max_tokens=40)
    [plain] = llm.chat(MESSAGES, sampling, chat_template_kwargs=kwargs)
    assert plain.prompt_token_ids == own
    start = list(llm.engine.think_ids.think_start)
    if opens is None:  # enable_thinking=False closed the think phase: nothing to budget, min_think refused
        [out] = llm.chat(MESSAGES, sampling, ThinkBudget(max_think=8), chat_template_kwargs=kwargs)
        assert out.prompt_token_ids == own and out.think_tokens == 0 and out.answer_text == out.text
        with pytest.raises(InvalidRequestError) as err:
            llm.chat(MESSAGES, sampling, ThinkBudget(min_think=4), chat_template_kwargs=kwargs)
        assert err.value.field == "min_think"
        return
    [budgeted] = llm.chat(MESSAGES, sampling, ThinkBudget(max_think=8), chat_template_kwargs=kwargs)
    assert budgeted.prompt_token_ids == own + ([] if opens else start)
    if kwargs is None:  # the trainer renders a sample's question exactly as the server renders the chat
        config = TrainConfig(model=str(chat_models[name]), dataset="unused", output_dir="unused", system_prompt="Be brief.",
                             think_format=llm.engine.think_template.name)
        renderer = make_renderer(tokenizer, config, ["question", "thinking_trajectories", "attempt"])
        prompt_ids, completion = renderer.texts({"question": "What is 2+3?", "thinking_trajectories": ["t"], "attempt": "5"})
        assert prompt_ids == own
        assert completion.startswith("t\n" if opens else llm.engine.think_template.think_start)
