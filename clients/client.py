"""A typed gRPC client for `s1serve.v1.Generation`, blocking and asyncio, with thinking budgets.

    from clients import S1Client
    with S1Client("localhost:50051") as client:
        done = client.generate("How many r's in strawberry?", max_tokens=512, min_think=64, max_think=256)
        print(done.think_text, done.answer_text, done.think_tokens, done.num_waits)
        for chunk in client.stream(messages=[{"role": "user", "content": "2+2?"}], max_think=32):
            print(chunk.phase, chunk.think_text or chunk.answer_text, chunk.events)
"""

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import grpc

from server.answers import Vote
from server.api.v1 import generation_pb2 as pb
from server.api.usage import Usage
from server.api.v1 import generation_pb2_grpc

_PHASES = {pb.PHASE_THINK: "think", pb.PHASE_ANSWER: "answer", pb.PHASE_UNSPECIFIED: "answer"}


@dataclass
class Completion:
    request_id: str
    text: str
    think_text: str
    answer_text: str
    token_ids: list[int]
    usage: Usage
    forced: list[bool] = field(default_factory=list)  # per token: forced by the engine, not sampled
    samples: list["Completion"] = field(default_factory=list)  # n > 1: every sample, by index
    vote: Vote | None = None  # when asked for: the majority answer over the samples

    @property
    def think_tokens(self) -> int:
        return self.usage.think_tokens

    @property
    def num_waits(self) -> int:
        return self.usage.num_waits


@dataclass
class StreamChunk:
    """One streamed step: its text by phase, the engine's events, and usage on the last chunk."""

    request_id: str
    think_text: str
    answer_text: str
    token_ids: list[int]
    events: list[str]  # "WAIT_INSERTED" | "THINK_END_FORCED"
    phase: str  # the phase after this step: "think" | "answer"
    usage: Usage | None = None
    finished: bool = field(default=False)
    forced: list[bool] = field(default_factory=list)  # per token of token_ids
    index: int = 0  # the sample (n > 1)
    vote: Vote | None = None  # on the final chunk, when asked for

    @classmethod
    def from_pb(cls, m: pb.GenerateStreamResponse) -> "StreamChunk":
        text = {pb.PHASE_THINK: "", pb.PHASE_ANSWER: ""}
        for d in m.deltas:
            text[d.phase] += d.text
        finished = m.HasField("usage")
        return cls(m.request_id, text[pb.PHASE_THINK], text[pb.PHASE_ANSWER], list(m.token_ids),
                   [pb.Event.Name(e) for e in m.events], _PHASES[m.phase],
                   Usage.from_pb(m.usage) if finished else None, finished, list(m.forced), m.index,
                   _vote(m.vote) if m.HasField("vote") else None)


def build_request(prompt: str | None = None, messages: list[dict] | None = None, *, request_id: str = "",
                  max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                  top_k: int | None = None, seed: int | None = None, stop: list[str] | None = None,
                  stop_token_ids: list[int] | None = None, presence_penalty: float | None = None,
                  frequency_penalty: float | None = None, repetition_penalty: float | None = None,
                  min_p: float | None = None, n: int | None = None, vote: str | None = None,
                  adaptive: dict | bool | None = None,
                  min_think: int | None = None, max_think: int | None = None, max_waits: int | None = None,
                  wait_string: str | None = None, answer_prefix: str | None = None, budget: bool | None = None,
                  chat_template_kwargs: dict | None = None, reasoning_effort: str | None = None) -> pb.GenerateRequest:
    """`budget=True` (or any budget field, or `reasoning_effort`) starts generation in the think phase."""
    sampling = pb.SamplingOptions(stop=stop or [], stop_token_ids=stop_token_ids or [])
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p),
                        ("top_k", top_k), ("seed", seed), ("presence_penalty", presence_penalty),
                        ("frequency_penalty", frequency_penalty), ("repetition_penalty", repetition_penalty),
                        ("min_p", min_p), ("n", n)):
        if value is not None:
            setattr(sampling, name, value)
    request = pb.GenerateRequest(request_id=request_id, sampling=sampling)
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt and messages")
    if prompt is not None:
        request.prompt = prompt
    else:
        request.messages.CopyFrom(pb.Messages(messages=[pb.ChatMessage(**m) for m in messages]))
    fields = dict(min_think=min_think, max_think=max_think, max_waits=max_waits, wait_string=wait_string,
                  answer_prefix=answer_prefix)
    if budget or adaptive or any(v is not None for v in fields.values()):
        request.budget.CopyFrom(pb.ThinkBudget(**{k: v for k, v in fields.items() if v is not None}))
    if adaptive:  # True (the server's defaults) or {every, agree, probe_tokens, method}
        request.budget.adaptive.CopyFrom(pb.AdaptiveThinking(**(adaptive if isinstance(adaptive, dict) else {})))
    request.vote = vote or ""
    if chat_template_kwargs is not None:
        request.chat_template_kwargs.update(chat_template_kwargs)
    request.reasoning_effort = reasoning_effort or ""
    return request


def _vote(m: pb.Vote) -> Vote:
    return Vote(m.answer, m.count, list(m.answers), m.method)


def _completion(reply: pb.GenerateResponse) -> Completion:
    samples = [Completion(reply.request_id, s.text, s.think_text, s.answer_text, list(s.token_ids), Usage.from_pb(s.usage),
                          list(s.forced)) for s in reply.samples]
    return Completion(reply.request_id, reply.text, reply.think_text, reply.answer_text, list(reply.token_ids),
                      Usage.from_pb(reply.usage), list(reply.forced), samples,
                      _vote(reply.vote) if reply.HasField("vote") else None)


def _credentials(tls: bool, root_certificates: bytes | None):
    return grpc.ssl_channel_credentials(root_certificates) if tls or root_certificates else None


class S1Client:
    def __init__(self, address: str = "localhost:50051", api_key: str | None = None, tls: bool = False,
                 root_certificates: bytes | None = None, timeout: float | None = None):
        credentials = _credentials(tls, root_certificates)
        self.channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.timeout = timeout

    def generate(self, prompt: str | None = None, **kwargs) -> Completion:
        return _completion(self.stub.Generate(build_request(prompt, **kwargs), metadata=self.metadata, timeout=self.timeout))

    def stream(self, prompt: str | None = None, **kwargs) -> Iterator[StreamChunk]:
        call = self.stub.GenerateStream(build_request(prompt, **kwargs), metadata=self.metadata, timeout=self.timeout)
        try:
            for message in call:
                yield StreamChunk.from_pb(message)
        finally:
            call.cancel()  # leaving the loop early cancels the request server-side

    def feedback(self, request_id: str, correct: bool, score: float | None = None) -> None:
        outcome = pb.FeedbackRequest.CORRECT if correct else pb.FeedbackRequest.INCORRECT
        self.stub.Feedback(pb.FeedbackRequest(request_id=request_id, outcome=outcome, score=score),
                           metadata=self.metadata, timeout=self.timeout)

    def abort(self, *request_ids: str) -> list[str]:
        return list(self.stub.Abort(pb.AbortRequest(request_ids=request_ids), metadata=self.metadata).aborted)

    def model_info(self) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=self.metadata, timeout=self.timeout)

    def load(self) -> pb.Load:
        return self.stub.GetLoad(pb.GetLoadRequest(), metadata=self.metadata, timeout=self.timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "S1Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncS1Client:
    """The same calls as `S1Client`, awaitable; `stream` is an async iterator."""

    def __init__(self, address: str = "localhost:50051", api_key: str | None = None, tls: bool = False,
                 root_certificates: bytes | None = None, timeout: float | None = None):
        credentials = _credentials(tls, root_certificates)
        self.channel = (grpc.aio.secure_channel(address, credentials) if credentials
                        else grpc.aio.insecure_channel(address))
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.timeout = timeout

    async def generate(self, prompt: str | None = None, **kwargs) -> Completion:
        reply = await self.stub.Generate(build_request(prompt, **kwargs), metadata=self.metadata, timeout=self.timeout)
        return _completion(reply)

    async def stream(self, prompt: str | None = None, **kwargs) -> AsyncIterator[StreamChunk]:
        call = self.stub.GenerateStream(build_request(prompt, **kwargs), metadata=self.metadata, timeout=self.timeout)
        try:
            async for message in call:
                yield StreamChunk.from_pb(message)
        finally:
            call.cancel()

    async def feedback(self, request_id: str, correct: bool, score: float | None = None) -> None:
        outcome = pb.FeedbackRequest.CORRECT if correct else pb.FeedbackRequest.INCORRECT
        await self.stub.Feedback(pb.FeedbackRequest(request_id=request_id, outcome=outcome, score=score),
                                 metadata=self.metadata, timeout=self.timeout)

    async def abort(self, *request_ids: str) -> list[str]:
        reply = await self.stub.Abort(pb.AbortRequest(request_ids=request_ids), metadata=self.metadata)
        return list(reply.aborted)

    async def model_info(self) -> pb.ModelInfo:
        return await self.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=self.metadata, timeout=self.timeout)

    async def load(self) -> pb.Load:
        return await self.stub.GetLoad(pb.GetLoadRequest(), metadata=self.metadata, timeout=self.timeout)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncS1Client":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
