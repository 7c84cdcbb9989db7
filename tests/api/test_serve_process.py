"""`s1serve serve` as a real process: it announces its ports and readiness on stdout, serves, and on SIGTERM finishes the
in-flight request before exiting."""

import re
import signal
import subprocess
import sys
import threading

from clients import S1Client


def test_sigterm_drains_in_flight_requests_then_exits(llama_dir):
    cmd = [sys.executable, "-m", "server.cli", "--log-level", "INFO", "serve", "--model", str(llama_dir),
           "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0", "--num-kv-blocks", "64"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        threading.Thread(target=lambda: [lines.append(x) for x in proc.stderr], daemon=True).start()
        ready = proc.stdout.readline()  # the ready line, printed at any log level
        match = re.search(r"s1serve: ready: .* gRPC 127\.0\.0\.1:(\d+), HTTP 127\.0\.0\.1:(\d+)", ready)
        assert match, ready + "".join(lines)
        with S1Client(f"127.0.0.1:{match[1]}") as client:
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
