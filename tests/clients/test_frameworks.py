"""A real framework client from PyPI, with the defaults it sends, against the REST front:
langchain-openai's ChatOpenAI doing a chat, a stream and a budgeted request."""

import os

import openai
import pytest

os.environ.setdefault("LANGSMITH_TRACING", "false")  # no tracing calls to the network
langchain_openai = pytest.importorskip("langchain_openai")

PROMPT = [("user", "What is 2 + 3?")]


def chat_model(server, **kwargs):
    return langchain_openai.ChatOpenAI(model="llama0", base_url=server.http_url + "/v1", api_key="unused",
                                       max_retries=0, temperature=0, max_tokens=40, **kwargs)


def sdk_reply(server, **extra):
    c = openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0)
    return c.chat.completions.create(model="llama0", messages=[{"role": "user", "content": "What is 2 + 3?"}],
                                     temperature=0, max_tokens=40, **extra)


def test_langchain_chat_and_stream_get_the_servers_reply(server):
    reply = chat_model(server).invoke(PROMPT)
    expected = sdk_reply(server).choices[0].message.content
    assert reply.content == expected and expected
    assert reply.usage_metadata["output_tokens"] > 0
    chunks = list(chat_model(server, stream_usage=True).stream(PROMPT))  # stream_options.include_usage
    assert "".join(c.content for c in chunks) == expected
    assert sum(c.usage_metadata["output_tokens"] for c in chunks if c.usage_metadata) == reply.usage_metadata["output_tokens"]


def test_langchain_budgeted_request_answers_after_its_thinking(server):
    budget = {"min_think": 4, "max_think": 8}
    reply = chat_model(server, extra_body=budget).invoke(PROMPT)
    expected = sdk_reply(server, extra_body=budget)
    assert reply.content == expected.choices[0].message.content
    assert expected.usage.completion_tokens_details.reasoning_tokens == 8
    assert reply.usage_metadata["output_token_details"]["reasoning"] == 8
    assert reply.response_metadata["finish_reason"] in ("stop", "length")
