"""The REST front through the official openai SDK, /health and /metrics."""

import json
import urllib.error
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.engine import SamplingParams, ThinkBudget

from .conftest import assert_all_blocks_free


def client(server, api_key="unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key=api_key, max_retries=0)


def test_completions_with_a_budget_match_the_offline_engine(server, make_llm, llama_dir):
    reply = client(server).completions.create(
        model="llama0", prompt="Is 7 prime?", max_tokens=48, temperature=0, extra_body={"max_think": 6}
    )
    [ref] = make_llm(llama_dir, num_kv_blocks=64).generate(
        "Is 7 prime?", SamplingParams(temperature=0, max_tokens=48), ThinkBudget(max_think=6)
    )
    choice = reply.choices[0]
    assert choice.text == ref.answer_text and choice.reasoning_content == ref.think_text
    assert reply.usage.completion_tokens == 48 and reply.usage.completion_tokens_details.reasoning_tokens == 6
    assert choice.finish_reason == "length"


def test_chat_streaming_returns_reasoning_content_deltas(server):
    c = client(server)
    kwargs = dict(model="llama0", messages=[{"role": "user", "content": "hi"}], max_tokens=48, temperature=0,
                  extra_body={"max_think": 5})
    full = c.chat.completions.create(**kwargs)
    chunks = list(c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    reasoning = "".join(getattr(ch.choices[0].delta, "reasoning_content", None) or "" for ch in chunks if ch.choices)
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    message = full.choices[0].message
    assert (reasoning, content) == (message.reasoning_content, message.content)
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == 5
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["length"]


def test_without_a_budget_everything_is_content(server):
    reply = client(server).completions.create(model="llama0", prompt="hello", max_tokens=8, temperature=0)
    assert reply.choices[0].reasoning_content is None and reply.usage.completion_tokens_details.reasoning_tokens == 0
    streamed = client(server).completions.create(model="llama0", prompt="hello", max_tokens=8, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == reply.choices[0].text


def test_models_and_health(server):
    models = client(server).models.list()
    assert [m.id for m in models.data] == ["llama0"]
    with urllib.request.urlopen(server.http_url + "/health") as r:
        assert json.load(r) == {"status": "ok"}


def scrape(server) -> dict:
    with urllib.request.urlopen(server.http_url + "/metrics") as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    labels = {"model": "llama0", **labels}
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_parse_and_move_by_the_right_amounts(server):
    before = scrape(server)
    reply = client(server).completions.create(
        model="llama0", prompt="hello", max_tokens=48, temperature=0, extra_body={"max_think": 7}
    )
    after = scrape(server)
    moved = lambda name, **kw: value(after, name, **kw) - value(before, name, **kw)  # noqa: E731
    assert moved("s1serve_think_tokens_total") == 7
    assert moved("s1serve_answer_tokens_total") == reply.usage.completion_tokens - 7 - 4  # 4 = the s1 delimiter
    assert moved("s1serve_prompt_tokens_total") == reply.usage.prompt_tokens
    assert moved("s1serve_think_end_forced_total") == 1
    assert moved("s1serve_requests_total", finish_reason="length", budgeted="true") == 1
    assert moved("s1serve_time_to_first_token_seconds_count") == 1
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert (name, (("model", "llama0"),)) in after

    body = json.dumps({"request_id": reply.id, "outcome": "correct"}).encode()
    request = urllib.request.Request(server.http_url + "/v1/feedback", data=body, headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request).close()
    final = scrape(server)
    assert value(final, "s1serve_feedback_total", outcome="correct", think_bucket="16") - value(
        after, "s1serve_feedback_total", outcome="correct", think_bucket="16") == 1


def test_a_dropped_sse_client_frees_its_blocks(server):
    stream = client(server).completions.create(model="llama0", prompt="x", max_tokens=400, stream=True)
    next(iter(stream))
    stream.close()
    assert_all_blocks_free(server)


def test_openai_fields_at_their_neutral_values_are_accepted_and_others_named(server):
    neutral = dict(presence_penalty=0, frequency_penalty=0.0, logprobs=False, response_format={"type": "text"},
                   extra_body={"tools": [], "metadata": {"run": "eval-7"}, "store": False, "tool_choice": "none"})
    reply = client(server).chat.completions.create(model="llama0", messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=4, temperature=0, **neutral)
    assert reply.choices[0].finish_reason in ("stop", "length")
    for field, value in (("presence_penalty", 0.5), ("logprobs", True), ("response_format", {"type": "json_object"}),
                         ("store", True), ("n_best", 1)):
        with pytest.raises(openai.BadRequestError) as err:
            client(server).chat.completions.create(model="llama0", messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=4, extra_body={field: value})
        assert err.value.body["param"] == field


def test_logit_bias_reaches_the_sampler_on_both_fronts(server, stub):
    from server.api.v1 import generation_pb2 as pb

    target = 200  # a token id of the tiny vocabulary
    reply = client(server).completions.create(model="llama0", prompt="hi", max_tokens=3, temperature=0,
                                              logit_bias={str(target): 100})
    tokenizer = server.server.llm.engine.tokenizer
    assert reply.choices[0].text == tokenizer.decode([target] * 3)
    out = stub.Generate(pb.GenerateRequest(prompt="hi", sampling=pb.SamplingOptions(temperature=0, max_tokens=3,
                                                                                     logit_bias={target: 100})))
    assert list(out.token_ids) == [target] * 3
