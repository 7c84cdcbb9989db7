"""Bad input on both fronts: the right status, a message naming the field, and nothing lost.
Also overload (RESOURCE_EXHAUSTED / 429) and API-key auth."""

import json
import urllib.error
import urllib.request

import grpc
import pytest

from server.api.serve import BackgroundServer
from server.api.v1 import generation_pb2 as pb
from server.api.v1 import generation_pb2_grpc

from .conftest import API_KEY, assert_all_blocks_free, local

S = pb.SamplingOptions
LONG_PROMPT = "word " * 600  # over the tiny model's 512-token context

GRPC_CASES = [
    ("empty prompt", pb.GenerateRequest(prompt="", sampling=S(max_tokens=4)), "INVALID_ARGUMENT", "prompt"),
    ("no input", pb.GenerateRequest(sampling=S(max_tokens=4)), "INVALID_ARGUMENT", "prompt: is required"),
    ("negative temperature", pb.GenerateRequest(prompt="a", sampling=S(temperature=-1)), "INVALID_ARGUMENT", "temperature"),
    ("top_p zero", pb.GenerateRequest(prompt="a", sampling=S(top_p=0)), "INVALID_ARGUMENT", "top_p"),
    ("top_p above one", pb.GenerateRequest(prompt="a", sampling=S(top_p=1.5)), "INVALID_ARGUMENT", "top_p"),
    ("negative top_k", pb.GenerateRequest(prompt="a", sampling=S(top_k=-1)), "INVALID_ARGUMENT", "top_k"),
    ("zero max_tokens", pb.GenerateRequest(prompt="a", sampling=S(max_tokens=0)), "INVALID_ARGUMENT", "max_tokens"),
    ("huge seed", pb.GenerateRequest(prompt="a", sampling=S(seed=2**64 - 1)), "INVALID_ARGUMENT", "seed"),
    ("empty stop", pb.GenerateRequest(prompt="a", sampling=S(stop=[""])), "INVALID_ARGUMENT", "stop"),
    ("prompt too long", pb.GenerateRequest(prompt=LONG_PROMPT), "INVALID_ARGUMENT", "prompt: has"),
    ("negative min_think", pb.GenerateRequest(prompt="a", budget=pb.ThinkBudget(min_think=-1)), "INVALID_ARGUMENT", "min_think"),
    ("min above max", pb.GenerateRequest(prompt="a", budget=pb.ThinkBudget(min_think=9, max_think=3)), "INVALID_ARGUMENT", "min_think"),
    ("max_think beyond context", pb.GenerateRequest(prompt="a", budget=pb.ThinkBudget(max_think=100000)), "INVALID_ARGUMENT", "max_think"),
    ("wait is the delimiter", pb.GenerateRequest(prompt="a", budget=pb.ThinkBudget(min_think=3, wait_string="<|im_start|>")), "INVALID_ARGUMENT", "wait_string"),
    ("bad chat role", pb.GenerateRequest(messages=pb.Messages(messages=[pb.ChatMessage(role="robot", content="x")])), "INVALID_ARGUMENT", "messages[0].role"),
    ("empty chat", pb.GenerateRequest(messages=pb.Messages()), "INVALID_ARGUMENT", "messages"),
]

HTTP_CASES = [
    ("invalid json", "/v1/completions", b"{not json", 400, "body"),
    ("array body", "/v1/completions", [1, 2], 400, "body"),
    ("unknown field", "/v1/completions", {"prompt": "a", "bogus": 1}, 400, "bogus"),
    ("n=65", "/v1/completions", {"prompt": "a", "n": 65}, 400, "n"),
    ("vote without n", "/v1/completions", {"prompt": "a", "vote": "math"}, 400, "vote"),
    ("bad adaptive", "/v1/completions", {"prompt": "a", "adaptive": {"every": 0}}, 400, "adaptive.every"),
    ("other model", "/v1/completions", {"prompt": "a", "model": "gpt-9"}, 400, "model"),
    ("stream not bool", "/v1/completions", {"prompt": "a", "stream": "yes"}, 400, "stream"),
    ("no prompt", "/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("numeric prompt", "/v1/completions", {"prompt": 123}, 400, "prompt"),
    ("no messages", "/v1/chat/completions", {"max_tokens": 3}, 400, "messages"),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ("temperature string", "/v1/completions", {"prompt": "a", "temperature": "hot"}, 400, "temperature"),
    ("zero max_tokens", "/v1/completions", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("top_p two", "/v1/completions", {"prompt": "a", "top_p": 2}, 400, "top_p"),
    ("negative min_think", "/v1/completions", {"prompt": "a", "min_think": -1}, 400, "min_think"),
    ("min above max", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "min_think": 9, "max_think": 2}, 400, "min_think"),
    ("wait_string number", "/v1/completions", {"prompt": "a", "min_think": 2, "wait_string": 5}, 400, "wait_string"),
    ("stop of ints", "/v1/completions", {"prompt": "a", "stop": [1]}, 400, "stop"),
    ("max_think beyond context", "/v1/completions", {"prompt": "a", "max_think": 100000}, 400, "max_think"),
    ("streamed bad request", "/v1/completions", {"prompt": "", "stream": True}, 400, "prompt"),
    ("feedback unknown id", "/v1/feedback", {"request_id": "nope", "outcome": "correct"}, 404, "request_id"),
    ("feedback bad outcome", "/v1/feedback", {"request_id": "x", "outcome": "meh"}, 400, "outcome"),
    ("no route", "/v1/nowhere", {}, 404, "no route"),
]


def post(url: str, body, headers: dict | None = None) -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request) as r:
            return r.status, json.loads(r.read() or b"{}"), dict(r.headers)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), dict(err.headers)


@pytest.mark.parametrize("name,request_,code,message", GRPC_CASES, ids=[c[0] for c in GRPC_CASES])
def test_grpc_rejects_bad_requests_naming_the_field(stub, name, request_, code, message):
    for call in (stub.Generate, lambda r: list(stub.GenerateStream(r))):
        with pytest.raises(grpc.RpcError) as err:
            call(request_)
        assert err.value.code().name == code and message in err.value.details()


def test_grpc_feedback_errors(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.Feedback(pb.FeedbackRequest(request_id="nope", outcome=pb.FeedbackRequest.CORRECT))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "request_id" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.Feedback(pb.FeedbackRequest(request_id="nope"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "outcome" in err.value.details()


@pytest.mark.parametrize("name,path,body,status,param", HTTP_CASES, ids=[c[0] for c in HTTP_CASES])
def test_http_rejects_bad_requests_in_openai_error_shape(server, name, path, body, status, param):
    code, reply, _ = post(server.http_url + path, body)
    assert code == status
    error = reply["error"]
    assert error["code"] == status and param in error["message"] and error["type"]


def test_the_server_is_healthy_and_exact_after_all_the_bad_requests(server, stub):
    reply = stub.Generate(pb.GenerateRequest(prompt="still fine?", sampling=S(temperature=0, max_tokens=8)))
    assert reply.usage.completion_tokens == 8 or reply.usage.finish_reason == "stop"
    assert_all_blocks_free(server)


def test_overload_is_resource_exhausted_with_a_retry_hint(llama_dir):
    with BackgroundServer(llama_dir, local(max_waiting_requests=0), num_kv_blocks=32) as s:
        channel = grpc.insecure_channel(s.grpc_address)
        with pytest.raises(grpc.RpcError) as err:
            generation_pb2_grpc.GenerationStub(channel).Generate(pb.GenerateRequest(prompt="a"))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry" in err.value.details()
        assert dict(err.value.trailing_metadata()).get("retry-after") == "1"
        channel.close()
        code, reply, headers = post(s.http_url + "/v1/completions", {"prompt": "a"})
        assert code == 429 and reply["error"]["type"] == "rate_limit_error" and headers["Retry-After"] == "1"


def test_api_key_is_required_on_both_fronts(llama_dir):
    with BackgroundServer(llama_dir, local(api_key=API_KEY), num_kv_blocks=32) as s:
        channel = grpc.insecure_channel(s.grpc_address)
        stub = generation_pb2_grpc.GenerationStub(channel)
        request = pb.GenerateRequest(prompt="a", sampling=S(max_tokens=2))
        for metadata in ((), (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(request, metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as err:
                list(stub.GenerateStream(request, metadata=metadata))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = stub.Generate(request, metadata=(("authorization", f"Bearer {API_KEY}"),))
        assert ok.usage.completion_tokens >= 1
        channel.close()
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            code, reply, _ = post(s.http_url + "/v1/completions", {"prompt": "a", "max_tokens": 2}, headers)
            assert code == 401 and reply["error"]["type"] == "authentication_error"
        code, _, _ = post(s.http_url + "/v1/completions", {"prompt": "a", "max_tokens": 2},
                          {"Authorization": f"Bearer {API_KEY}"})
        assert code == 200
        with urllib.request.urlopen(s.http_url + "/health") as r:  # probes need no key
            assert r.status == 200
