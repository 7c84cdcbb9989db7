"""Real servers on free loopback ports over the tiny random-weight Llama."""

import grpc
import pytest

from server.api.config import ServerConfig
from server.api.serve import BackgroundServer
from server.api.v1 import generation_pb2_grpc

API_KEY = "test-key-123"


def local(**overrides) -> ServerConfig:
    return ServerConfig(host="127.0.0.1", grpc_port=0, http_port=0, **overrides)


@pytest.fixture(scope="module")
def server(llama_dir):
    # fp32 like make_llm: tests compare this server with the offline engine
    with BackgroundServer(llama_dir, local(), num_kv_blocks=256, block_size=8, default_max_tokens=32, dtype="float32") as s:
        yield s


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.grpc_address)
    yield generation_pb2_grpc.GenerationStub(channel)
    channel.close()


def wait_idle(server, timeout: float = 30.0) -> None:
    """Until the engine has nothing left (aborts are applied at the next engine step)."""
    import time

    deadline = time.monotonic() + timeout
    while server.server.llm.engine.has_unfinished() or server.server.llm.num_waiting:
        assert time.monotonic() < deadline, "engine did not go idle"
        time.sleep(0.02)


def assert_all_blocks_free(server) -> None:
    wait_idle(server)
    bm = server.server.llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks, f"{bm.num_blocks - bm.num_free_blocks} KV blocks leaked"
