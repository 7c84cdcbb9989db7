"""TLS on both fronts with a self-signed certificate (made with the openssl CLI)."""

import json
import shutil
import ssl
import subprocess
import urllib.request

import pytest

from clients import S1Client
from server.api.serve import BackgroundServer

from .conftest import local


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_both_fronts_serve_tls(llama_dir, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    with BackgroundServer(llama_dir, local(tls_cert=str(cert), tls_key=str(key)), num_kv_blocks=32) as s:
        with S1Client(f"localhost:{s.server.grpc_port}", root_certificates=cert.read_bytes()) as client:
            assert client.generate("hi", max_tokens=3, temperature=0).usage.completion_tokens >= 1
        context = ssl.create_default_context(cafile=str(cert))
        with urllib.request.urlopen(f"https://localhost:{s.server.http_port}/health", context=context) as r:
            assert json.load(r) == {"status": "ok"}
