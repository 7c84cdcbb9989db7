"""Load with random cancellations over both fronts at once: REST clients that disconnect (before
the first byte or mid-stream), gRPC calls that are cancelled, and requests that run to the end.
Bounded to ~20 s. Every completed reply must equal the same request alone, every cancelled
request must leave the engine within a second, and the KV cache must be empty afterwards."""

import asyncio
import json
import random
import time

import aiohttp
import grpc
import pytest

from server.api.serve import BackgroundServer
from server.api.v1 import generation_pb2 as pb
from server.api.v1 import generation_pb2_grpc

from .conftest import assert_all_blocks_free, local

DURATION_S = 20.0
WORKERS = 24
PROMPTS = [f"load prompt {i}: tell me about {w}" for i, w in enumerate("ships stars rivers maps bells owls gears tides".split())]
MAX_TOKENS = (8, 24, 64)


@pytest.fixture(scope="module")
def load_server(llama_dir):
    with BackgroundServer(llama_dir, local(), num_kv_blocks=512, max_num_seqs=16) as s:
        yield s


def test_random_cancellations_over_both_fronts_corrupt_nothing_and_free_everything(load_server):
    server = load_server
    engine = server.server.llm.engine
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        reference = {p: list(stub.Generate(pb.GenerateRequest(prompt=p, sampling=pb.SamplingOptions(
            temperature=0, max_tokens=max(MAX_TOKENS)))).token_ids) for p in PROMPTS}

    stats = {"completed": 0, "corrupted": 0, "cancelled": 0, "slow_aborts": 0, "errors": []}
    abort_latency: list[float] = []

    async def left_the_engine(request_id: str, since: float) -> None:
        while request_id in engine.sequences and time.monotonic() - since < 3:
            await asyncio.sleep(0.01)
        latency = time.monotonic() - since
        abort_latency.append(latency)
        stats["slow_aborts"] += latency > 1.0

    def check(prompt: str, max_tokens: int, got, expected) -> None:
        stats["completed"] += 1
        stats["corrupted"] += got != expected

    async def rest(session, rid: str, prompt: str, max_tokens: int, cancel_after: int | None) -> None:
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "request_id": rid}
        async with session.post(server.http_url + "/v1/completions", json=body) as response:
            assert response.status == 200, await response.text()
            text, chunks = [], 0
            async for line in response.content:
                if cancel_after is not None and chunks >= cancel_after:
                    response.close()  # the client leaves mid-stream
                    stats["cancelled"] += 1
                    await left_the_engine(rid, time.monotonic())
                    return
                if line.startswith(b"data: {"):
                    chunks += 1
                    text.append(json.loads(line[6:])["choices"][0]["text"])
        # REST carries text: compare it with the reference's
        check(prompt, max_tokens, "".join(text), engine.tokenizer.decode(reference[prompt][:max_tokens], skip_special_tokens=True))

    async def grpc_call(astub, rid: str, prompt: str, max_tokens: int, cancel_after: int | None) -> None:
        call = astub.GenerateStream(pb.GenerateRequest(request_id=rid, prompt=prompt, sampling=pb.SamplingOptions(
            temperature=0, max_tokens=max_tokens)))
        tokens, chunks = [], 0
        async for message in call:
            if cancel_after is not None and chunks >= cancel_after:
                call.cancel()
                stats["cancelled"] += 1
                await left_the_engine(rid, time.monotonic())
                return
            chunks += 1
            tokens += message.token_ids
        check(prompt, max_tokens, tokens, reference[prompt][:max_tokens])

    async def worker(w: int, session, astub) -> None:
        rng = random.Random(w)
        n = 0
        deadline = time.monotonic() + DURATION_S
        while time.monotonic() < deadline:
            rid = f"load-{w}-{n}"
            n += 1
            prompt, max_tokens = rng.choice(PROMPTS), rng.choice(MAX_TOKENS)
            cancel = rng.random() < 0.4
            cancel_after = rng.randint(1, 6) if cancel and rng.random() < 0.7 else None
            use_rest = rng.random() < 0.5
            coro = (rest(session, rid, prompt, max_tokens, cancel_after) if use_rest
                    else grpc_call(astub, rid, prompt, max_tokens, cancel_after))
            try:
                if cancel and cancel_after is None:  # gone before its first byte: queued or just admitted
                    task = asyncio.ensure_future(coro)
                    await asyncio.sleep(rng.uniform(0.0, 0.05))
                    if not task.done():
                        task.cancel()
                        stats["cancelled"] += 1
                        since = time.monotonic()
                        await asyncio.gather(task, return_exceptions=True)
                        await left_the_engine(rid, since)
                    continue
                await coro
            except (grpc.aio.AioRpcError, aiohttp.ClientError, AssertionError) as exc:
                stats["errors"].append(f"{rid}: {exc!r}"[:300])

    async def main() -> None:
        async with aiohttp.ClientSession() as session, grpc.aio.insecure_channel(server.grpc_address) as channel:
            astub = generation_pb2_grpc.GenerationStub(channel)
            await asyncio.gather(*(worker(w, session, astub) for w in range(WORKERS)))

    asyncio.run(main())
    print(f"load: {stats['completed']} completed, {stats['cancelled']} cancelled, max abort latency"
          f" {max(abort_latency, default=0):.3f} s, {len(stats['errors'])} errors")
    assert not stats["errors"], stats["errors"][:5]
    assert stats["completed"] > 50 and stats["cancelled"] > 50, stats
    assert stats["corrupted"] == 0, stats
    assert stats["slow_aborts"] == 0, (stats, max(abort_latency))
    assert_all_blocks_free(server)
    assert not engine.sequences
