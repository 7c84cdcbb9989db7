"""The serving process under faults and bad input: a dead engine is loud, health tells the truth,
bad flags fail in one line before the model loads, clients that leave free their requests, and
malformed input is a 4xx naming the field."""

import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.api.config import ServerConfig
from server.api.serve import S1Server
from server.engine import SamplingParams

from ..conftest import assert_no_kv_leak
from .conftest import assert_all_blocks_free, local, wait_idle


def post(server, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(server.http_url + path, body, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


# ---- a dead engine is loud ------------------------------------------------------------------------
def test_a_dead_engine_loop_fails_requests_turns_health_off_and_exits_non_zero(llama_dir):
    async def main() -> tuple[int, grpc.StatusCode, int]:
        server = S1Server(str(llama_dir), local(), {"num_kv_blocks": 64})
        serving = asyncio.create_task(server.serve_forever())
        while not getattr(server, "http", None) or not server.http.ready:
            await asyncio.sleep(0.05)

        def dies(*_):  # a bug outside the step's own error handling kills the loop
            raise SystemExit("injected")

        server.llm.engine.step = dies
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            from server.api.v1 import generation_pb2 as pb
            from server.api.v1 import generation_pb2_grpc

            stub = generation_pb2_grpc.GenerationStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Generate(pb.GenerateRequest(prompt="hi"))
            health = health_pb2_grpc.HealthStub(channel)
            status = (await health.Check(health_pb2.HealthCheckRequest(service=""))).status
        return await asyncio.wait_for(serving, 30), err.value.code(), status

    code, rpc_code, _ = asyncio.run(main())
    assert code == 1 and rpc_code == grpc.StatusCode.UNAVAILABLE


def test_a_cuda_error_in_a_step_kills_the_engine_but_a_bug_in_one_step_does_not(llama_dir):
    """A sticky device error fails every later step, so the engine is declared dead (health off,
    exit 1); any other step failure fails the batch and the engine goes on."""
    from server.engine import AsyncLLM

    async def run(error: Exception) -> tuple[bool, bool, str]:
        llm = AsyncLLM(str(llama_dir), num_kv_blocks=32)
        step = llm.engine.step
        failures = [error]

        def flaky():
            if failures:
                raise failures.pop()
            return step()

        llm.engine.step = flaky
        try:
            with pytest.raises(Exception):
                async for _ in llm.generate("hi", SamplingParams(temperature=0, max_tokens=4)):
                    pass
            healthy_after = llm.healthy()
            if healthy_after:  # the next request is served as usual
                outs = [d async for d in llm.generate("hi", SamplingParams(temperature=0, max_tokens=4))]
                served = outs[-1].finish_reason
            else:
                served = ""
            return healthy_after, llm.error is not None, served
        finally:
            llm.shutdown()

    assert asyncio.run(run(RuntimeError("CUDA error: an illegal memory access was encountered"))) == (False, True, "")
    assert asyncio.run(run(ValueError("a bug in one step"))) == (True, False, "length")


def test_an_interrupted_generate_leaves_the_engine_ready_for_the_next_call(make_llm, llama_dir):
    llm = make_llm(llama_dir, num_kv_blocks=64)
    step, calls = llm.engine.step, []

    def interrupted():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of a batch
        return step()

    llm.engine.step = interrupted
    with pytest.raises(KeyboardInterrupt):
        llm.generate(["a", "b"], SamplingParams(temperature=0, max_tokens=50))
    llm.engine.step = step
    assert_no_kv_leak(llm)
    [out] = llm.generate("a", SamplingParams(temperature=0, max_tokens=5))
    assert len(out.token_ids) >= 1


# ---- flags fail in one line, before the model loads -----------------------------------------------
def serve_fails(llama_dir, *flags: str) -> str:
    done = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--model", str(llama_dir), "--host", "127.0.0.1",
                           *flags], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("s1serve: error: "), done.stderr[-2000:]
    return lines[0]


def test_bad_flags_and_taken_ports_fail_in_one_line(llama_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert "grpc_port" in serve_fails(llama_dir, "--grpc-port", str(port), "--http-port", "0")
        assert "http_port" in serve_fails(llama_dir, "--grpc-port", "0", "--http-port", str(port))
    assert "http_port: 70000" in serve_fails(llama_dir, "--http-port", "70000")
    assert "max_model_len: 100000" in serve_fails(llama_dir, "--grpc-port", "0", "--http-port", "0", "--max-model-len", "100000")
    assert "num_kv_blocks" in serve_fails(llama_dir, "--grpc-port", "0", "--http-port", "0", "--num-kv-blocks", "100000000")


def test_grpc_does_not_share_its_port():
    from server.api.grpc_server import build_grpc_server
    from server.errors import InvalidConfigError

    async def bind_taken() -> None:  # grpc.aio servers are made inside an event loop
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            build_grpc_server(None, f"127.0.0.1:{taken.getsockname()[1]}")

    with pytest.raises(InvalidConfigError, match="grpc_port"):
        asyncio.run(bind_taken())


def test_server_config_rejects_impossible_values():
    from server.errors import InvalidConfigError

    for bad in (dict(grpc_port=-1), dict(http_port=65536), dict(grpc_port=9000, http_port=9000), dict(max_prompt_chars=-1)):
        with pytest.raises(InvalidConfigError):
            ServerConfig(**bad)


# ---- clients that leave free their requests -----------------------------------------------------
def raw_request(server, body: dict) -> socket.socket:
    host, port = server.http_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


@pytest.mark.parametrize("stream", [True, False])
def test_a_rest_client_that_disconnects_frees_its_request_within_a_second(server, stream):
    engine, frontend = server.server.llm.engine, server.server.frontend
    aborted = frontend.metrics.requests.labels(frontend.model_name, "abort", "false")
    before = aborted._value.get()
    long = {"prompt": "x", "max_tokens": 480, "temperature": 0, "stream": stream}  # greedy "x" runs to the limit
    socks = [raw_request(server, long) for _ in range(4)]
    deadline = time.monotonic() + 10
    while len(engine.sequences) < 4:  # every request reached the engine (a client gone before that aborts nothing)
        assert time.monotonic() < deadline
        time.sleep(0.01)
    if stream:
        for sock in socks:  # it streams, then the client leaves
            seen = b""
            while b"data:" not in seen:
                seen += sock.recv(4096)
    for sock in socks:
        sock.close()
    wait_idle(server, timeout=1.5)
    assert_all_blocks_free(server)
    deadline = time.monotonic() + 2
    while aborted._value.get() - before < 4:  # they were aborted, not run to the end
        assert time.monotonic() < deadline, aborted._value.get() - before
        time.sleep(0.02)


# ---- malformed input is a 4xx naming the field ------------------------------------------------------
@pytest.mark.parametrize("body,field", [
    (b"[" * 100_000 + b"]" * 100_000, "body"),
    (json.dumps({"prompt": "hi", "stream": True, "stream_options": "yes"}).encode(), "stream_options"),
    (json.dumps({"prompt": "hi", "max_tokens": 10**20}).encode(), "max_tokens"),
    (b'{"prompt": "hi", "temperature": Infinity}', "temperature"),
    (json.dumps({"prompt": "hi", "max_think": ""}).encode(), "max_think"),
    (json.dumps({"prompt": "hi", "request_id": "a\nforged log line"}).encode(), "request_id"),
    (json.dumps({"prompt": "hi", "min_think": 4, "wait_string": "<|im_end|>"}).encode(), "wait_string"),
    (json.dumps({"prompt": "hi", "stop": ["s"] * 1000}).encode(), "stop"),
    (json.dumps({"prompt": "x" * 1_000_001}).encode(), "prompt"),
    (json.dumps({"prompt": "hi", "reasoning_effort": ["high"]}).encode(), "reasoning_effort"),
])
def test_malformed_rest_input_is_a_400_naming_the_field(server, body, field):
    code, reply = post(server, "/v1/completions", body)
    assert code == 400 and reply["error"]["param"] == field, reply


def test_an_unknown_charset_is_a_400(server):
    code, reply = post(server, "/v1/completions", b'{"prompt": "hi"}', {"Content-Type": "application/json; charset=klingon"})
    assert code == 400 and reply["error"]["param"] == "body"


def test_the_drain_refuses_new_work_as_unavailable(server, stub):
    from server.api.v1 import generation_pb2 as pb

    frontend = server.server.frontend
    frontend.draining = True
    try:
        code, reply = post(server, "/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 4}).encode())
        assert code == 503 and "shutting down" in reply["error"]["message"]
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(pb.GenerateRequest(prompt="hi"))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        frontend.draining = False


# ---- requests belong to the API key that made them --------------------------------------------------
def test_abort_and_feedback_act_only_on_the_callers_own_requests(llama_dir):
    from server.api.serve import BackgroundServer
    from server.api.v1 import generation_pb2 as pb
    from server.api.v1 import generation_pb2_grpc

    keys = {"a": "key-of-tenant-a", "b": "key-of-tenant-b"}
    with BackgroundServer(llama_dir, local(api_key=",".join(keys.values())), num_kv_blocks=64) as s:
        channel = grpc.insecure_channel(s.grpc_address)
        stub = generation_pb2_grpc.GenerationStub(channel)
        auth = {t: (("authorization", f"Bearer {k}"),) for t, k in keys.items()}
        long = pb.GenerateRequest(prompt="x", request_id="shared-id", sampling=pb.SamplingOptions(temperature=0, max_tokens=300))
        # The same client id from two tenants: no collision, two requests.
        a_stream = stub.GenerateStream(long, metadata=auth["a"])
        b_stream = stub.GenerateStream(long, metadata=auth["b"])
        next(a_stream), next(b_stream)
        # b aborts "shared-id": its own request ends, a's goes on to its length.
        assert list(stub.Abort(pb.AbortRequest(request_ids=["shared-id"]), metadata=auth["b"]).aborted) == ["shared-id"]
        assert [m for m in b_stream][-1].usage.finish_reason == "abort"
        assert [m for m in a_stream][-1].usage.finish_reason in ("length", "stop")
        # A finished request of a's: b can neither grade it (gRPC, REST) nor see it; a can.
        done = stub.Generate(pb.GenerateRequest(prompt="hi", request_id="graded", sampling=pb.SamplingOptions(max_tokens=4)),
                             metadata=auth["a"])
        assert done.request_id == "graded"
        feedback = pb.FeedbackRequest(request_id="graded", outcome=pb.FeedbackRequest.CORRECT)
        with pytest.raises(grpc.RpcError) as err:
            stub.Feedback(feedback, metadata=auth["b"])
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        body = json.dumps({"request_id": "graded", "outcome": "correct"}).encode()
        assert post(s, "/v1/feedback", body, {"Authorization": f"Bearer {keys['b']}"})[0] == 404
        assert post(s, "/v1/feedback", body, {"Authorization": f"Bearer {keys['a']}"})[0] == 200
        stub.Feedback(feedback, metadata=auth["a"])
        # b's Abort of an id only a has running aborts nothing and reports nothing.
        a_long = stub.GenerateStream(pb.GenerateRequest(prompt="x", request_id="a-only",
                                                        sampling=pb.SamplingOptions(temperature=0, max_tokens=300)),
                                     metadata=auth["a"])
        next(a_long)
        assert list(stub.Abort(pb.AbortRequest(request_ids=["a-only"]), metadata=auth["b"]).aborted) == []
        assert [m for m in a_long][-1].usage.finish_reason in ("length", "stop")
        channel.close()
        assert_all_blocks_free(s)


@pytest.mark.parametrize("method", ["Generate", "GenerateStream", "Feedback", "Abort"])
@pytest.mark.parametrize("data", [b"\xff\xff\xff", b"\x0a\x02\xff\xfe"], ids=["corrupt", "bad-utf8"])  # field 1 is a string everywhere
def test_a_grpc_message_that_does_not_parse_is_invalid_argument(server, stub, method, data):
    from server.api.v1 import generation_pb2 as pb

    channel = grpc.insecure_channel(server.grpc_address)
    path = f"/s1serve.v1.Generation/{method}"
    call = (channel.unary_stream if method == "GenerateStream" else channel.unary_unary)(path)  # raw bytes both ways
    with pytest.raises(grpc.RpcError) as err:
        reply = call(data, timeout=10)
        if method == "GenerateStream":
            list(reply)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("request: Error parsing message")
    channel.close()
    assert stub.Generate(pb.GenerateRequest(prompt="still fine", sampling=pb.SamplingOptions(max_tokens=2))).usage.completion_tokens == 2
