"""n samples, votes and adaptive thinking through both fronts, against the offline engine."""

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.api.v1 import generation_pb2 as pb
from server.engine import AdaptiveThinking, SamplingParams, ThinkBudget

import urllib.request


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0)


def metric(server, name: str) -> float:
    with urllib.request.urlopen(server.http_url + "/metrics") as r:
        families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    return sum(s.value for s in families[name].samples if s.name.endswith(("_total", "_count")))


def test_n_samples_on_rest_and_grpc_equal_the_offline_engines(server, stub, make_llm, llama_dir):
    sampling = SamplingParams(temperature=1.0, seed=5, max_tokens=40, n=3)
    [ref] = make_llm(llama_dir, num_kv_blocks=64).generate("sample me", sampling, ThinkBudget(max_think=6))
    reply = client(server).completions.create(model="llama0", prompt="sample me", max_tokens=40, temperature=1.0,
                                              seed=5, n=3, extra_body={"max_think": 6})
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert [c.text for c in reply.choices] == [s.answer_text for s in ref.samples]
    assert [c.reasoning_content for c in reply.choices] == [s.think_text for s in ref.samples]
    assert reply.usage.completion_tokens == sum(len(s.token_ids) for s in ref.samples)
    assert reply.usage.num_samples == 3

    chunks = list(client(server).completions.create(model="llama0", prompt="sample me", max_tokens=40, temperature=1.0,
                                                    seed=5, n=3, stream=True, extra_body={"max_think": 6}))
    streamed = {i: "".join(c.choices[0].text or "" for c in chunks if c.choices and c.choices[0].index == i) for i in range(3)}
    assert streamed == {i: s.answer_text for i, s in enumerate(ref.samples)}

    request = pb.GenerateRequest(prompt="sample me", sampling=pb.SamplingOptions(temperature=1.0, seed=5, max_tokens=40, n=3),
                                 budget=pb.ThinkBudget(max_think=6))
    out = stub.Generate(request)
    assert [list(s.token_ids) for s in out.samples] == [s.token_ids for s in ref.samples]
    assert list(out.token_ids) == ref.token_ids and out.usage.num_samples == 3
    messages = list(stub.GenerateStream(request))
    per_index = {i: [t for m in messages if m.index == i for t in m.token_ids] for i in range(3)}
    assert per_index == {i: s.token_ids for i, s in enumerate(ref.samples)}
    assert sorted(m.index for m in messages if m.finish_reason) == [0, 1, 2]
    assert [m.HasField("usage") for m in messages].count(True) == 1 and messages[-1].HasField("usage")


def test_a_vote_returns_the_majority_answer_on_both_fronts(server, stub):
    tokenizer = server.server.llm.engine.tokenizer
    seven = tokenizer.encode("7", add_special_tokens=False)[0]
    body = dict(model="llama0", prompt="vote", max_tokens=40, temperature=1.0, seed=1, n=4,
                logit_bias={str(seven): 100}, extra_body={"max_think": 4, "vote": "exact"})
    reply = client(server).completions.create(**body).model_dump()
    vote = reply["vote"]
    assert vote["method"] == "exact" and vote["count"] == 4 and vote["answer"].startswith("77")
    assert len(vote["answers"]) == 4
    chunks = list(client(server).completions.create(stream=True, **body))
    [streamed] = [c.model_dump()["vote"] for c in chunks if getattr(c, "vote", None)]
    assert streamed == vote
    request = pb.GenerateRequest(prompt="vote", vote="exact", budget=pb.ThinkBudget(max_think=4),
                                 sampling=pb.SamplingOptions(temperature=1.0, seed=1, max_tokens=40, n=4, logit_bias={seven: 100}))
    assert stub.Generate(request).vote.answer == vote["answer"]
    assert list(stub.GenerateStream(request))[-1].vote.count == 4
    with pytest.raises(openai.BadRequestError) as err:
        client(server).completions.create(model="llama0", prompt="x", n=2, extra_body={"vote": "plurality"})
    assert err.value.body["param"] == "vote"


def test_adaptive_thinking_on_both_fronts_reports_its_probes(server, stub, make_llm, llama_dir):
    tokenizer = server.server.llm.engine.tokenizer
    seven = tokenizer.encode("7", add_special_tokens=False)[0]
    adaptive = {"every": 8, "agree": 3, "probe_tokens": 6}
    [ref] = make_llm(llama_dir, num_kv_blocks=64).generate(
        "converge", SamplingParams(temperature=0, max_tokens=120, logit_bias={seven: 30.0}),
        ThinkBudget(max_think=80, adaptive=AdaptiveThinking(**adaptive)))
    probes_before = metric(server, "s1serve_adaptive_probes")
    reply = client(server).completions.create(model="llama0", prompt="converge", max_tokens=120, temperature=0,
                                              logit_bias={str(seven): 30}, extra_body={"max_think": 80, "adaptive": adaptive})
    assert reply.usage.think_converged == 1 and reply.usage.num_probes == 3 and reply.usage.probe_tokens == 18
    assert reply.usage.completion_tokens_details.reasoning_tokens == ref.think_tokens == 24
    assert reply.choices[0].text == ref.answer_text
    assert metric(server, "s1serve_adaptive_probes") - probes_before == 3
    request = pb.GenerateRequest(prompt="converge", budget=pb.ThinkBudget(max_think=80, adaptive=pb.AdaptiveThinking(**adaptive)),
                                 sampling=pb.SamplingOptions(temperature=0, max_tokens=120, logit_bias={seven: 30.0}))
    messages = list(stub.GenerateStream(request))
    assert pb.THINK_CONVERGED in [e for m in messages for e in m.events]
    assert messages[-1].usage.num_probes == 3
