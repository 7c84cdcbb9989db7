"""The gRPC front (`s1serve.v1.Generation`) on grpc.aio, with the standard health service
(NOT_SERVING until the model is loaded and warmed), server reflection and optional API-key auth."""

import asyncio
import dataclasses

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..errors import InvalidConfigError, InvalidRequestError, OverloadedError, RequestNotFoundError, S1ServeError, UnavailableError
from .frontend import Frontend, StreamUsage, tenants
from .usage import Usage
from .v1 import generation_pb2 as pb
from .v1 import generation_pb2_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name
MAX_MESSAGE_BYTES = 64 * 2**20
PHASES = {"think": pb.PHASE_THINK, "answer": pb.PHASE_ANSWER}
EVENTS = {"WAIT_INSERTED": pb.WAIT_INSERTED, "THINK_END_FORCED": pb.THINK_END_FORCED, "THINK_CONVERGED": pb.THINK_CONVERGED}
OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")  # probes and tools need no key


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, api_keys: list[str]):
        self.expected = set(tenants(api_keys))

    @staticmethod
    async def _deny(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key (authorization: Bearer ...)")

    @classmethod
    async def _deny_stream(cls, request, context):
        await cls._deny(request, context)
        yield  # pragma: no cover  (abort raises)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        metadata = dict(details.invocation_metadata or ())
        if handler is None or details.method.startswith(OPEN_METHODS) or metadata.get("authorization") in self.expected:
            return handler
        deny = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.unary_unary_rpc_method_handler
        return deny(self._deny_stream if handler.unary_stream else self._deny,
                    handler.request_deserializer, handler.response_serializer)


class _Malformed:
    """What a request that does not parse becomes, so that the handler answers INVALID_ARGUMENT
    (grpc's own deserializer failure is UNKNOWN plus a logged traceback)."""

    def __init__(self, reason: str):
        self.reason = reason


def _tolerant(message_cls):
    def parse(data: bytes):
        try:
            return message_cls.FromString(data)
        except DecodeError as exc:  # corrupt wire format, or a string field that is not UTF-8
            return _Malformed(str(exc))
    return parse


def _refusing_malformed(method, streaming: bool):
    if streaming:
        async def stream_handler(request, context):
            if isinstance(request, _Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: {request.reason}")
            async for message in method(request, context):
                yield message
        return stream_handler

    async def unary_handler(request, context):
        if isinstance(request, _Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: {request.reason}")
        return await method(request, context)
    return unary_handler


def add_generation_service(servicer: "GenerationService", server) -> None:
    """The generated `add_GenerationServicer_to_server`, with requests parsed by `_tolerant`."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["Generation"].methods:
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(
            _refusing_malformed(getattr(servicer, method.name), method.server_streaming),
            request_deserializer=_tolerant(getattr(pb, method.input_type.name)),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


def _parse(frontend: Frontend, request: pb.GenerateRequest, owner: str):
    s = request.sampling
    kwargs = dict(
        request_id=request.request_id, owner=owner,
        temperature=s.temperature if s.HasField("temperature") else None,
        top_p=s.top_p if s.HasField("top_p") else None,
        top_k=s.top_k if s.HasField("top_k") else None,
        seed=s.seed if s.HasField("seed") else None,
        max_tokens=s.max_tokens if s.HasField("max_tokens") else None,
        stop=list(s.stop) or None,
        stop_token_ids=list(s.stop_token_ids) or None,
        logit_bias=dict(s.logit_bias) or None,
        **{name: getattr(s, name) if s.HasField(name) else None
           for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_p", "logprobs", "n")},
        vote=request.vote or None,
    )
    if request.HasField("chat_template_kwargs"):
        kwargs["chat_template_kwargs"] = json_format.MessageToDict(request.chat_template_kwargs)
    kwargs["reasoning_effort"] = request.reasoning_effort or None
    which = request.WhichOneof("input")
    if which == "prompt":
        kwargs["prompt"] = request.prompt
    elif which == "messages":
        kwargs["messages"] = [{"role": m.role, "content": m.content} for m in request.messages.messages]
    if request.HasField("budget"):
        b = request.budget
        kwargs["budget"] = dict(min_think=b.min_think, max_think=b.max_think, max_waits=b.max_waits,
                                wait_string=b.wait_string,
                                answer_prefix=b.answer_prefix if b.HasField("answer_prefix") else None)
        if b.HasField("adaptive"):
            a = b.adaptive
            kwargs["budget"]["adaptive"] = {"every": a.every or None, "agree": a.agree or None,
                                            "probe_tokens": a.probe_tokens or None, "method": a.method or None}
    return frontend.parse(**kwargs)


def _logprobs(engine, token_ids: list[int], logprobs: list) -> list[pb.TokenLogprob]:
    out = []
    for token, lp in zip(token_ids, logprobs):
        message = pb.TokenLogprob(token_id=token, token=engine.token_text(token))
        if lp is not None:
            message.logprob = lp.logprob
            message.top.extend(pb.TopLogprob(token_id=t, token=engine.token_text(t), logprob=v) for t, v in lp.top)
        out.append(message)
    return out


def _answer(sample: dict, req) -> str:
    """What a vote reads of a sample: its answer phase (all of its text without a budget)."""
    return "".join(sample["answer"] if req.budget is not None else sample["text"])


def _usage(u: Usage) -> pb.Usage:
    return pb.Usage(**u.fields())


async def _abort_with(context, exc: Exception):
    if isinstance(exc, InvalidRequestError):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, OverloadedError):
        context.set_trailing_metadata((("retry-after", f"{exc.retry_after_s:g}"),))
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    if isinstance(exc, UnavailableError):
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
    if isinstance(exc, RequestNotFoundError):
        await context.abort(grpc.StatusCode.NOT_FOUND, f"request_id: {exc.args[0]!r} is not a finished request")
    await context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")


class GenerationService(generation_pb2_grpc.GenerationServicer):
    def __init__(self, frontend: Frontend, api_keys: list[str] | None = None):
        self.frontend = frontend
        self.tenants = tenants(api_keys)

    def _owner(self, context) -> str:
        """The caller's tenant (the interceptor has already refused unknown keys)."""
        metadata = dict(context.invocation_metadata() or ())
        return self.tenants.get(metadata.get("authorization", ""), "")

    async def Generate(self, request, context):
        usage = StreamUsage()
        samples: dict[int, dict] = {}
        try:
            req = await asyncio.to_thread(_parse, self.frontend, request, self._owner(context))
            async for delta in self.frontend.stream(req, usage):
                s = samples.setdefault(delta.index, {"text": [], "think": [], "answer": [], "forced": [], "logprobs": []})
                s["text"].append(delta.new_text)
                s["think"].append(delta.think_text)
                s["answer"].append(delta.answer_text)
                s["forced"] += delta.forced
                s["logprobs"] += delta.logprobs
            vote = await self.frontend.vote(req, [_answer(samples[i], req) for i in sorted(samples)]) if req.vote else None
        except S1ServeError as exc:
            await _abort_with(context, exc)
        engine = self.frontend.llm.engine
        out = [pb.Sample(index=i, text="".join(s["text"]), think_text="".join(s["think"]), answer_text="".join(s["answer"]),
                         token_ids=usage.samples[i].token_ids, forced=s["forced"], usage=_usage(usage.samples[i]))
               for i, s in sorted(samples.items())]
        first = out[0]
        reply = pb.GenerateResponse(
            request_id=req.request_id, text=first.text, think_text=first.think_text, answer_text=first.answer_text,
            token_ids=first.token_ids, usage=_usage(usage), forced=first.forced,
            logprobs=_logprobs(engine, list(first.token_ids), samples[0]["logprobs"]),
            samples=out if req.sampling.n > 1 else [],
        )
        if vote is not None:
            reply.vote.CopyFrom(pb.Vote(**dataclasses.asdict(vote)))
        return reply

    async def GenerateStream(self, request, context):
        usage = StreamUsage()
        answers: dict[int, list[str]] = {}
        try:
            req = await asyncio.to_thread(_parse, self.frontend, request, self._owner(context))
            async for delta in self.frontend.stream(req, usage):
                deltas = [pb.TextDelta(phase=p, text=t)
                          for p, t in ((pb.PHASE_THINK, delta.think_text), (pb.PHASE_ANSWER, delta.answer_text)) if t]
                message = pb.GenerateStreamResponse(
                    request_id=req.request_id, deltas=deltas, token_ids=delta.new_token_ids, forced=delta.forced,
                    events=[EVENTS[e] for e in delta.events], phase=PHASES[delta.phase],
                    logprobs=_logprobs(self.frontend.llm.engine, delta.new_token_ids, delta.logprobs),
                    index=delta.index, finish_reason=delta.finish_reason or "",
                )
                answers.setdefault(delta.index, []).append(delta.answer_text if req.budget is not None else delta.new_text)
                if delta.request_finished:
                    message.usage.CopyFrom(_usage(usage))
                    if req.vote:
                        vote = await self.frontend.vote(req, ["".join(answers[i]) for i in sorted(answers)])
                        message.vote.CopyFrom(pb.Vote(**dataclasses.asdict(vote)))
                yield message
        except S1ServeError as exc:
            await _abort_with(context, exc)

    async def Feedback(self, request, context):
        if request.outcome == pb.FeedbackRequest.OUTCOME_UNSPECIFIED:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "outcome: must be CORRECT or INCORRECT")
        try:
            self.frontend.feedback(request.request_id, request.outcome == pb.FeedbackRequest.CORRECT,
                                   request.score if request.HasField("score") else None, self._owner(context))
        except S1ServeError as exc:
            await _abort_with(context, exc)
        return pb.FeedbackResponse()

    async def Abort(self, request, context):
        """Only the caller's own requests: another tenant's id aborts nothing and is not reported."""
        return pb.AbortResponse(aborted=self.frontend.abort(list(request.request_ids), self._owner(context)))

    async def GetModelInfo(self, request, context):
        engine = self.frontend.llm.engine
        info = pb.ModelInfo(
            model=self.frontend.model_name, model_type=engine.model_config.model_type,
            max_model_len=engine.max_model_len, max_num_seqs=engine.config.max_num_seqs,
            max_waiting_requests=self.frontend.max_waiting, default_max_tokens=engine.config.default_max_tokens,
            min_answer_tokens=engine.config.min_answer_tokens,
        )
        if engine.think_template:
            t = engine.think_template
            info.think_template.CopyFrom(pb.ThinkTemplate(
                name=t.name, think_start=t.think_start, think_end=t.think_end, answer_prefix=t.answer_prefix, wait=t.wait
            ))
        return info

    async def GetLoad(self, request, context):
        return pb.Load(**self.frontend.load())


def build_grpc_server(frontend: Frontend, address: str, api_keys: list[str] | None = None,
                      tls: tuple[bytes, bytes] | None = None) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """A server on `address` (port 0 = any free port) that is not started yet, its health servicer
    (set SERVING once warmed up), and the bound port."""
    # No SO_REUSEPORT: a second server on the same port must fail, not share the traffic.
    options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.so_reuseport", 0)]
    interceptors = [ApiKeyInterceptor(api_keys)] if api_keys else []
    server = grpc.aio.server(interceptors=interceptors, options=options)
    add_generation_service(GenerationService(frontend, api_keys), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        if tls:
            port = server.add_secure_port(address, grpc.ssl_server_credentials([tls]))
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc: "Failed to bind to address ..."
        raise InvalidConfigError(f"grpc_port: {address} cannot be bound ({exc})") from None
    return server, health_servicer, port


async def set_serving(health_servicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)
