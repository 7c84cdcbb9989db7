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
    for field, value in (("presence_penalty", 2.5), ("top_logprobs", 2), ("response_format", {"type": "json_object"}),
                         ("store", True), ("n_best", 1), ("min_thnk", 5)):
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


def test_penalties_min_p_and_logprobs_match_the_offline_engine_on_both_fronts(server, stub, make_llm, llama_dir):
    from server.api.v1 import generation_pb2 as pb

    knobs = dict(presence_penalty=0.8, frequency_penalty=0.5, repetition_penalty=1.3, min_p=0.02)
    sampling = SamplingParams(temperature=0.9, seed=11, max_tokens=40, logprobs=3, **knobs)
    [ref] = make_llm(llama_dir, num_kv_blocks=64).generate("penalize me", sampling, ThinkBudget(max_think=4))
    tokenizer = server.server.llm.engine.tokenizer
    kwargs = dict(model="llama0", prompt="penalize me", max_tokens=40, temperature=0.9, seed=11, logprobs=3,
                  presence_penalty=0.8, frequency_penalty=0.5,
                  extra_body={"repetition_penalty": 1.3, "min_p": 0.02, "max_think": 4})
    reply = client(server).completions.create(**kwargs)
    lp = reply.choices[0].logprobs
    assert lp.tokens == [tokenizer.decode([t], skip_special_tokens=False) for t in ref.token_ids]
    assert lp.token_logprobs == pytest.approx([r.logprob if r else None for r in ref.logprobs], abs=1e-5)
    # The legacy form keys alternatives by text (tokens decoding alike collapse, as at OpenAI).
    assert [sorted(top) if top else None for top in lp.top_logprobs] == [
        sorted({tokenizer.decode([t], skip_special_tokens=False) for t, _ in r.top}) if r else None for r in ref.logprobs]
    assert None in lp.token_logprobs  # the forced delimiter and answer prefix have none
    streamed = list(client(server).completions.create(stream=True, **kwargs))
    assert [v for ch in streamed for v in (ch.choices[0].logprobs.token_logprobs if ch.choices[0].logprobs else [])] \
        == pytest.approx(lp.token_logprobs, abs=1e-5)

    chat = dict(model="llama0", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0,
                logprobs=True, top_logprobs=2, frequency_penalty=1.0)
    full = client(server).chat.completions.create(**chat)
    content = full.choices[0].logprobs.content
    assert len(content) == full.usage.completion_tokens and all(len(e.top_logprobs) == 2 for e in content)
    assert all(e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob for e in content)
    chunks = list(client(server).chat.completions.create(stream=True, **chat))
    streamed_content = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [e.token for e in streamed_content] == [e.token for e in content]
    assert [e.logprob for e in streamed_content] == pytest.approx([e.logprob for e in content], abs=1e-5)

    options = pb.SamplingOptions(temperature=0.9, seed=11, max_tokens=40, logprobs=3, **knobs)
    out = stub.Generate(pb.GenerateRequest(prompt="penalize me", sampling=options, budget=pb.ThinkBudget(max_think=4)))
    assert list(out.token_ids) == ref.token_ids
    assert [m.logprob if m.HasField("logprob") else None for m in out.logprobs] == pytest.approx(
        [r.logprob if r else None for r in ref.logprobs], abs=1e-5)
    assert [[t.token_id for t in m.top] for m in out.logprobs] == [[t for t, _ in r.top] if r else [] for r in ref.logprobs]
    stream = stub.GenerateStream(pb.GenerateRequest(prompt="penalize me", sampling=options, budget=pb.ThinkBudget(max_think=4)))
    assert [m.token_id for msg in stream for m in msg.logprobs] == ref.token_ids


@pytest.mark.parametrize("body, field", [
    ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs: true
    ({"logprobs": True, "top_logprobs": 21}, "logprobs"),
    ({"logprobs": 2}, "logprobs"),  # chat's logprobs is a boolean
    ({"presence_penalty": "high"}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_p": 2}, "min_p"),
])
def test_bad_sampling_fields_are_400s_naming_them(server, body, field):
    with pytest.raises(openai.BadRequestError) as err:
        client(server).chat.completions.create(model="llama0", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=4, extra_body=body)
    assert err.value.body["param"] == field
