"""The Python client and `s1serve ask` against a real server."""

import asyncio

from clients import AsyncS1Client, S1Client
from server.cli import main

from ..api.conftest import assert_all_blocks_free


def test_client_generate_stream_feedback_and_info(server):
    with S1Client(server.grpc_address) as client:
        done = client.generate("Is 9 prime?", max_tokens=48, temperature=0, max_think=4)
        assert done.think_tokens == 4 and done.usage.think_end_forced and len(done.token_ids) == 48
        chunks = list(client.stream("Is 9 prime?", max_tokens=48, temperature=0, max_think=4))
        assert [t for c in chunks for t in c.token_ids] == done.token_ids
        assert "".join(c.think_text for c in chunks) == done.think_text
        assert chunks[-1].finished and chunks[-1].usage.think_tokens == 4
        assert [e for c in chunks for e in c.events] == ["THINK_END_FORCED"]
        client.feedback(done.request_id, correct=True, score=1.0)
        assert client.model_info().think_template.name == "s1"
        assert client.load().num_kv_blocks == 256


def test_leaving_a_client_stream_early_cancels_the_request(server):
    with S1Client(server.grpc_address) as client:
        for chunk in client.stream("long", max_tokens=400):
            break
    assert_all_blocks_free(server)


def test_async_client_runs_concurrent_budgeted_requests(server):
    async def run():
        async with AsyncS1Client(server.grpc_address) as client:
            return await asyncio.gather(*(client.generate(f"q{i}", max_tokens=48, temperature=0, min_think=4, max_think=8)
                                          for i in range(8)))

    for done in asyncio.run(run()):
        assert 4 <= done.think_tokens <= 8  # Waits are unlimited, so min_think always holds here


def test_ask_prints_think_and_answer_apart(server, capsys):
    code = main(["ask", "2+2?", "--server", server.grpc_address, "--max-think", "5", "--max-tokens", "48"])
    assert code == 0
    out, err = capsys.readouterr()
    assert out.startswith("── thinking ──\n") and "── answer (think end forced at max_think) ──" in out
    assert "thinking 5" in err
