"""The gRPC front: round trips with budgets, concurrency, cancellation, health, reflection, stubs."""

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from server.api.v1 import generation_pb2 as pb
from server.api.v1 import generation_pb2_grpc
from server.engine import SamplingParams, ThinkBudget
from tests.conftest import random_prompts

from .conftest import assert_all_blocks_free

GREEDY = pb.SamplingOptions(temperature=0, max_tokens=48)


def budgeted(prompt: str, **budget) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, sampling=GREEDY, budget=pb.ThinkBudget(**budget))


def test_unary_with_a_budget_matches_the_offline_engine(stub, make_llm, llama_dir):
    reply = stub.Generate(budgeted("Is 7 prime?", max_think=6))
    [ref] = make_llm(llama_dir, num_kv_blocks=64).generate(
        "Is 7 prime?", SamplingParams(temperature=0, max_tokens=48), ThinkBudget(max_think=6)
    )
    assert list(reply.token_ids) == ref.token_ids
    assert (reply.think_text, reply.answer_text, reply.text) == (ref.think_text, ref.answer_text, ref.text)
    u = reply.usage
    assert (u.think_tokens, u.answer_tokens, u.completion_tokens) == (6, ref.answer_tokens, len(ref.token_ids))
    assert u.think_end_forced and u.finish_reason == ref.finish_reason
    assert u.prompt_tokens == len(ref.prompt_token_ids) and 0 < u.time_to_first_token_s <= u.total_time_s


def test_stream_is_phase_tagged_with_events_and_final_usage(stub):
    messages = list(stub.GenerateStream(budgeted("Count to three.", max_think=5)))
    assert all(m.usage.completion_tokens == 0 for m in messages[:-1]) and messages[-1].usage.completion_tokens == 48
    assert messages[-1].usage.total_time_s >= messages[-1].usage.time_to_first_token_s > 0  # set before the last message
    events = [e for m in messages for e in m.events]
    assert events == [pb.THINK_END_FORCED]
    phases = [m.phase for m in messages]
    assert phases[0] == pb.PHASE_THINK and phases[-1] == pb.PHASE_ANSWER
    assert phases == sorted(phases)  # think, then answer
    think = "".join(d.text for m in messages for d in m.deltas if d.phase == pb.PHASE_THINK)
    answer = "".join(d.text for m in messages for d in m.deltas if d.phase == pb.PHASE_ANSWER)
    unary = stub.Generate(budgeted("Count to three.", max_think=5))
    assert (think, answer) == (unary.think_text, unary.answer_text)
    assert [t for m in messages for t in m.token_ids] == list(unary.token_ids)


def test_chat_messages_and_model_info(stub, server):
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.think_template.name == "s1" and info.max_model_len == 512 and info.default_max_tokens == 32
    chat = pb.GenerateRequest(messages=pb.Messages(messages=[pb.ChatMessage(role="user", content="hi")]),
                              sampling=GREEDY, budget=pb.ThinkBudget(max_think=3))
    reply = stub.Generate(chat)
    assert reply.usage.think_tokens == 3 and reply.usage.think_end_forced


def test_64_concurrent_streams_give_the_same_tokens_as_one_by_one(server, stub):
    prompts = [" ".join(map(str, p)) for p in random_prompts(64, 1000, seed=21, max_len=12)]
    requests = [pb.GenerateRequest(prompt=p, sampling=GREEDY) for p in prompts]
    one_by_one = [list(stub.Generate(r).token_ids) for r in requests]

    async def run_all():
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            astub = generation_pb2_grpc.GenerationStub(channel)

            async def one(r):
                return [t async for m in astub.GenerateStream(r) for t in m.token_ids]

            return await asyncio.gather(*(one(r) for r in requests))

    assert asyncio.run(run_all()) == one_by_one
    assert_all_blocks_free(server)


def test_cancelled_streams_free_their_blocks_and_spare_the_others(server, stub):
    long = pb.SamplingOptions(temperature=0, max_tokens=400)
    keep = [pb.GenerateRequest(prompt=f"keep {i}", sampling=GREEDY) for i in range(4)]
    expected = [list(stub.Generate(r).token_ids) for r in keep]

    async def run():
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            astub = generation_pb2_grpc.GenerationStub(channel)

            async def cancel_after_two(i):
                call = astub.GenerateStream(pb.GenerateRequest(prompt=f"cancel me {i}", sampling=long))
                seen = 0
                async for _ in call:
                    seen += 1
                    if seen == 2:
                        call.cancel()
                        break
                return seen

            async def full(r):
                return [t async for m in astub.GenerateStream(r) for t in m.token_ids]

            return await asyncio.gather(*(cancel_after_two(i) for i in range(20)), *(full(r) for r in keep))

    results = asyncio.run(run())
    assert results[:20] == [2] * 20
    assert results[20:] == expected
    assert_all_blocks_free(server)


def test_deadlines_abort_the_request(server, stub):
    with pytest.raises(grpc.RpcError) as err:
        list(stub.GenerateStream(pb.GenerateRequest(prompt="x", sampling=pb.SamplingOptions(temperature=0, max_tokens=400)),
                                 timeout=0.05))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_all_blocks_free(server)


def test_abort_by_request_id(server, stub):
    # greedy "x" runs the whole 400 tokens on the tiny model, so the abort always finds it running
    request = pb.GenerateRequest(request_id="to-abort", prompt="x", sampling=pb.SamplingOptions(temperature=0, max_tokens=400))
    stream = stub.GenerateStream(request)
    next(stream)
    reply = stub.Abort(pb.AbortRequest(request_ids=["to-abort", "unknown"]))
    assert list(reply.aborted) == ["to-abort"]
    final = list(stream)[-1]
    assert final.usage.finish_reason == "abort"
    assert_all_blocks_free(server)


def test_health_is_serving_and_reflection_lists_the_service(server):
    channel = grpc.insecure_channel(server.grpc_address)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "s1serve.v1.Generation"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    [reply] = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in reply.list_services_response.service}
    assert {"s1serve.v1.Generation", "grpc.health.v1.Health"} <= names
    # What grpcurl asks next: the service's file and the well-known file it imports (Struct).
    for symbol in ("s1serve.v1.Generation", "google.protobuf.Struct"):
        [reply] = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)]))
        assert reply.file_descriptor_response.file_descriptor_proto, symbol
    channel.close()


def test_load_report(stub):
    load = stub.GetLoad(pb.GetLoadRequest())
    assert load.num_kv_blocks == 256 and load.free_kv_blocks <= 256 and 0 <= load.kv_cache_usage <= 1


def test_generated_stubs_are_fresh(tmp_path):
    """The stubs are build output: regenerate from protos/ and compare with the installed ones."""
    import runpy

    generate = runpy.run_path(str(Path(__file__).parents[2] / "protos" / "generate.py"))["generate"]
    fresh = {p.name: p.read_text() for p in generate(tmp_path)}
    installed = Path(pb.__file__).parent
    assert fresh and all((installed / name).read_text() == text for name, text in fresh.items()), (
        "server/api/v1 is stale: reinstall (pip install --no-build-isolation -e .) after editing protos/"
    )
