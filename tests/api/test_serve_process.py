"""`s1serve serve` as a real process: it announces its ports and readiness on stdout, serves, and on SIGTERM finishes the
in-flight request before exiting."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from transformers import AutoTokenizer

from clients import S1Client


def start_serve(model_dir, *flags: str, log: tuple[str, ...] = ("--log-level", "INFO")):
    """`s1serve serve` on free ports; returns the process, its stderr lines (collected as they come)
    and the (gRPC, HTTP) ports read from its ready line."""
    cmd = [sys.executable, "-m", "server.cli", *log, "serve", "--model", str(model_dir),
           "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0", "--num-kv-blocks", "64", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: [lines.append(x) for x in proc.stderr], daemon=True).start()
    ready = proc.stdout.readline()  # the ready line, printed at any log level
    match = re.search(r"s1serve: ready: .* gRPC 127\.0\.0\.1:(\d+), HTTP 127\.0\.0\.1:(\d+); attention \w+", ready)
    if not match:
        proc.kill()
        raise AssertionError(ready + "".join(lines))
    assert "KV cache 1,024 tokens (64 blocks x 16)" in ready, ready
    return proc, lines, (int(match[1]), int(match[2]))


def post(port: int, body: dict, path: str = "/v1/completions"):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=60)


def test_sigterm_drains_in_flight_requests_then_exits(llama_dir):
    proc, lines, (grpc_port, _) = start_serve(llama_dir)
    try:
        with S1Client(f"127.0.0.1:{grpc_port}") as client:
            stream = client.stream("a long answer please", max_tokens=150, temperature=0, budget=False)
            first = next(stream)
            proc.send_signal(signal.SIGTERM)
            rest = list(stream)
        chunks = [first, *rest]
        assert chunks[-1].usage.finish_reason in ("length", "stop")
        assert sum(len(c.token_ids) for c in chunks) == chunks[-1].usage.completion_tokens
        assert proc.wait(timeout=60) == 0
        assert any("draining" in line for line in lines)
    finally:
        proc.kill()


def test_rest_drain_keeps_its_timeout_refuses_new_work_and_ends_every_stream(llama_dir):
    STREAMS = 24
    proc, lines, (_, http_port) = start_serve(llama_dir, "--drain-timeout-s", "2", "--max-num-seqs", "1")
    eos = AutoTokenizer.from_pretrained(llama_dir).eos_token_id
    body = {"prompt": "go", "max_tokens": 480, "temperature": 0, "stream": True, "logit_bias": {str(eos): -100}}
    ends: list[tuple[str, list[str]]] = []  # per stream: its last line and the finish reasons it saw

    def consume():
        with post(http_port, body) as response:
            lines_seen = [line.decode().strip() for line in response if line.strip()]
        reasons = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in lines_seen if x.startswith("data: {")]
        ends.append((lines_seen[-1], [r for r in reasons if r]))

    try:
        # one runs, the rest wait: 24 x 480 decode steps, far more than the 2 s drain on any of these
        # machines (8 streams once finished inside it on a Zen 5, and nothing was left to abort)
        streams = [threading.Thread(target=consume) for _ in range(STREAMS)]
        for t in streams:
            t.start()
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        time.sleep(0.3)
        try:
            post(http_port, {"prompt": "late", "max_tokens": 4})
            raise AssertionError("a request during the drain was served")
        except urllib.error.HTTPError as exc:
            assert exc.code == 503 and exc.headers["Retry-After"]
        assert proc.wait(timeout=30) == 0
        took = time.monotonic() - start
        for t in streams:
            t.join(timeout=10)
        assert took < 2 + 5, f"the 2 s drain took {took:.1f} s"
        assert len(ends) == STREAMS and all(last == "data: [DONE]" for last, _ in ends), ends
        reasons = [r for _, rs in ends for r in rs]
        assert len(reasons) == STREAMS and "abort" in reasons  # cut at the timeout, each with a proper end
        assert any("drain timeout" in line for line in lines)
    finally:
        proc.kill()


def test_json_logs_are_one_object_per_line_with_request_fields(llama_dir):
    proc, lines, (_, http_port) = start_serve(llama_dir, log=("--log-level", "INFO", "--log-format", "json"))
    try:
        with post(http_port, {"prompt": "hello", "max_tokens": 5, "request_id": "json-log-1"}) as response:
            assert json.load(response)["usage"]["completion_tokens"] >= 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
    time.sleep(0.2)
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert not [line for line in lines if line.startswith(("INFO ", "WARNING ", "ERROR "))]  # no text-format records
    assert {"time", "level", "logger", "message"} <= set(records[0])
    [finished] = [r for r in records if r.get("request_id") == "json-log-1"]
    assert finished["level"] == "INFO" and finished["completion_tokens"] >= 1 and finished["finish_reason"] in ("stop", "length")


def worker_ranks(pid: int) -> list[int]:
    """The tensor-parallel worker processes of server `pid` (spawned interpreters, not the
    multiprocessing resource tracker)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        kids = [int(c) for c in f.read().split()]
    return [k for k in kids if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()]


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"  # exited, not yet reaped
    except FileNotFoundError:
        return True


def test_a_two_rank_server_answers_both_fronts_and_sigterm_stops_every_rank(llama_dir):
    import grpc

    from server.api.v1 import generation_pb2 as pb
    from server.api.v1 import generation_pb2_grpc

    proc, lines, (grpc_port, http_port) = start_serve(llama_dir, "--tensor-parallel-size", "2")
    try:
        workers = worker_ranks(proc.pid)
        assert len(workers) == 1
        with post(http_port, {"prompt": "hello", "max_tokens": 6, "temperature": 0}) as response:
            rest = json.load(response)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            reply = generation_pb2_grpc.GenerationStub(channel).Generate(
                pb.GenerateRequest(prompt="hello", sampling=pb.SamplingOptions(temperature=0, max_tokens=6)))
        assert rest["choices"][0]["text"] == reply.text and reply.usage.completion_tokens == 6
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        time.sleep(0.5)
        assert all(gone(w) for w in workers)
    finally:
        proc.kill()


def test_a_killed_worker_rank_makes_the_server_exit_non_zero_naming_it(llama_dir):
    proc, lines, (_, http_port) = start_serve(llama_dir, "--tensor-parallel-size", "2")
    try:
        [worker] = worker_ranks(proc.pid)
        os.kill(worker, signal.SIGKILL)
        start = time.monotonic()
        code = proc.wait(timeout=60)
        assert code != 0 and time.monotonic() - start < 30
        time.sleep(0.2)
        assert any("tensor-parallel rank 1 died" in line for line in lines), "".join(lines[-20:])
    finally:
        proc.kill()
