"""The thinking-budget contract through the real fronts: the openai SDK on REST and the gRPC client.

Each test is one of the ways an ordinary client field used to lose the answer (issue: phases own
their text, budgeted requests always answer, chat prompts are the model's own, reasoning on the
wire as clients expect)."""

import grpc
import openai
import pytest

from clients import S1Client
from server.api.serve import BackgroundServer

from .conftest import assert_all_blocks_free, local

PREFIX = "\nFinal Answer:"
CHAT = [{"role": "user", "content": "Is 7 prime?"}]


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0)


def test_a_newline_stop_with_max_think_keeps_the_forced_answer_prefix(server):
    reply = client(server).chat.completions.create(model="llama0", messages=CHAT, max_tokens=60, temperature=0,
                                                   stop=["\n"], extra_body={"max_think": 8})
    message = reply.choices[0].message
    assert message.content.startswith(PREFIX) and "\n" not in message.content[len(PREFIX):]
    assert reply.usage.completion_tokens_details.reasoning_tokens == 8
    assert message.reasoning_content == message.reasoning and message.reasoning


def test_a_stop_string_seen_while_thinking_does_not_end_the_request(server):
    kwargs = dict(model="llama0", messages=CHAT, max_tokens=60, temperature=0, extra_body={"max_think": 20})
    ref = client(server).chat.completions.create(**kwargs).choices[0].message
    stop = next(ref.reasoning[i : i + 2] for i in range(len(ref.reasoning) - 1)
                if ref.reasoning[i : i + 2].strip() and ref.reasoning[i : i + 2] not in ref.content)
    out = client(server).chat.completions.create(stop=[stop], **kwargs).choices[0].message
    assert out.reasoning == ref.reasoning and out.content == ref.content


def test_stop_token_ids_ignore_forced_tokens(server):
    think = server.server.llm.engine.think_ids
    stops = [think.answer_prefix[-1], think.think_end[-1]]  # both forced in at the cut
    with S1Client(server.grpc_address) as grpc_client:
        ref = grpc_client.generate("Count.", max_tokens=60, temperature=0, max_think=6)
        out = grpc_client.generate("Count.", max_tokens=60, temperature=0, max_think=6, stop_token_ids=stops)
    # The first *sampled* answer token in `stops` ends it; the forced ones before it never do.
    first = next((i for i, (t, f) in enumerate(zip(ref.token_ids, ref.forced))
                  if not f and t in stops and i >= ref.usage.think_tokens), None)
    assert out.token_ids == (ref.token_ids if first is None else ref.token_ids[: first + 1])
    assert out.answer_text.startswith(PREFIX)


def test_max_think_beyond_max_tokens_is_refused_naming_the_field_on_both_fronts(server):
    with pytest.raises(openai.BadRequestError) as err:
        client(server).chat.completions.create(model="llama0", messages=CHAT, max_tokens=16, extra_body={"max_think": 64})
    assert err.value.body["param"] == "max_think" and "max_tokens" in err.value.body["message"]
    with S1Client(server.grpc_address) as grpc_client, pytest.raises(grpc.RpcError) as rpc:
        grpc_client.generate("Is 7 prime?", max_tokens=16, max_think=64)
    assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and rpc.value.details().startswith("max_think:")
    assert_all_blocks_free(server)


def test_unset_max_tokens_gives_a_budgeted_request_its_answer(server):
    default = server.server.llm.engine.config.default_max_tokens  # 32 on the test server
    for budget in ({"max_think": default + 20}, {"min_think": 10}):
        reply = client(server).chat.completions.create(model="llama0", messages=CHAT, temperature=0, extra_body=budget)
        usage = reply.usage
        assert usage.completion_tokens > usage.completion_tokens_details.reasoning_tokens  # an answer phase exists
        assert usage.completion_tokens_details.reasoning_tokens <= budget.get("max_think", default)
        assert reply.choices[0].message.content


def test_reasoning_comes_as_both_names_and_a_chunk_carries_reasoning_or_content(server):
    stream = client(server).chat.completions.create(model="llama0", messages=CHAT, max_tokens=60, temperature=0,
                                                    stream=True, stream_options={"include_usage": True},
                                                    extra_body={"min_think": 4, "max_think": 12})
    chunks = list(stream)
    reasoning, content = [], []
    for chunk in chunks[:-1]:
        delta = chunk.choices[0].delta
        r, c = getattr(delta, "reasoning_content", None), delta.content
        assert not (r and c), "a chunk carries reasoning or content, never both"
        assert r == getattr(delta, "reasoning", None)
        reasoning.append(r or "")
        content.append(c or "")
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == 12
    unary = client(server).chat.completions.create(model="llama0", messages=CHAT, max_tokens=60, temperature=0,
                                                   extra_body={"min_think": 4, "max_think": 12}).choices[0].message
    assert "".join(reasoning) == unary.reasoning_content == unary.reasoning and "".join(content) == unary.content
    plain = client(server).chat.completions.create(model="llama0", messages=CHAT, max_tokens=8)
    assert plain.usage.completion_tokens_details.reasoning_tokens == 0  # present, unbudgeted too


def test_reasoning_effort_maps_to_the_servers_budgets_and_answer_prefix_is_the_requests(server):
    efforts = server.server.frontend.reasoning_efforts
    reply = client(server).chat.completions.create(model="llama0", messages=CHAT, temperature=0, reasoning_effort="low",
                                                   max_tokens=60)
    thought = reply.usage.completion_tokens_details.reasoning_tokens
    assert 0 < thought <= min(efforts["low"], server.server.llm.engine.think_room(60))
    with pytest.raises(openai.BadRequestError) as err:
        client(server).chat.completions.create(model="llama0", messages=CHAT, reasoning_effort="extreme")
    assert err.value.body["param"] == "reasoning_effort"
    own = client(server).chat.completions.create(model="llama0", messages=CHAT, max_tokens=60, temperature=0,
                                                 extra_body={"max_think": 4, "answer_prefix": " So the answer is"})
    assert own.choices[0].message.content.startswith(" So the answer is")


def test_unary_grpc_text_shows_the_delimiter_as_written_and_phases_apart(server):
    with S1Client(server.grpc_address) as grpc_client:
        done = grpc_client.generate("Is 7 prime?", max_tokens=60, temperature=0, max_think=6, stop=["\n"])
    assert done.text == done.think_text + "<|im_start|>answer" + done.answer_text
    assert done.answer_text.startswith(PREFIX) and sum(done.forced) == len(done.forced) - done.usage.think_tokens - (
        done.usage.answer_tokens - len(server.server.llm.engine.think_ids.answer_prefix))


@pytest.fixture(scope="module")
def qwen3_server(qwen3_dir):
    with BackgroundServer(qwen3_dir, local(), num_kv_blocks=64, block_size=8) as s:
        yield s


def test_chat_template_kwargs_reach_the_template_on_both_fronts(qwen3_server):
    tokenizer = qwen3_server.server.llm.engine.tokenizer

    def own(enable_thinking: bool) -> int:
        return len(tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                 enable_thinking=enable_thinking)["input_ids"])

    rest = openai.OpenAI(base_url=qwen3_server.http_url + "/v1", api_key="unused", max_retries=0)
    off = rest.chat.completions.create(model=qwen3_server.server.frontend.model_name, messages=CHAT, max_tokens=20,
                                       extra_body={"max_think": 8, "chat_template_kwargs": {"enable_thinking": False}})
    assert off.usage.prompt_tokens == own(False) and off.usage.completion_tokens_details.reasoning_tokens == 0
    with S1Client(qwen3_server.grpc_address) as grpc_client:
        on = grpc_client.generate(messages=CHAT, max_tokens=40, max_think=8, chat_template_kwargs={"enable_thinking": True})
        assert on.usage.prompt_tokens == own(True) + 2  # + the think opener `<think>\n`
        assert on.usage.think_tokens == 8
        with pytest.raises(grpc.RpcError) as rpc:
            grpc_client.generate(messages=CHAT, max_tokens=40, min_think=4, chat_template_kwargs={"enable_thinking": False})
        assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and rpc.value.details().startswith("min_think:")
    with pytest.raises(openai.BadRequestError) as err:
        rest.chat.completions.create(model=qwen3_server.server.frontend.model_name, messages=CHAT,
                                     extra_body={"chat_template_kwargs": {"tokenize": False}})
    assert err.value.body["param"] == "chat_template_kwargs"
