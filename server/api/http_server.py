"""The OpenAI-compatible REST front on aiohttp, in the same process and on the same engine as gRPC.

`POST /v1/completions`, `POST /v1/chat/completions` (SSE with `"stream": true`), `GET /v1/models`,
`POST /v1/feedback`, `GET /health`, `GET /metrics`. Budgets are extra body fields (`min_think`,
`max_think`, `max_waits`, `wait_string`, `answer_prefix`; any of them, or OpenAI's
`reasoning_effort`, turns budget forcing on); the thinking comes back as both `reasoning_content`
(DeepSeek, older vLLM) and `reasoning` (current vLLM), a streamed chunk carrying one or the other,
never both, and its length as `usage.completion_tokens_details.reasoning_tokens`, so the official
`openai` SDK works unchanged (`extra_body`). `chat_template_kwargs` reach the chat template.
"""

import asyncio
import dataclasses
import json
import logging
import time
import uuid

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..errors import InvalidRequestError, OverloadedError, RequestNotFoundError, S1ServeError, UnavailableError
from .frontend import Frontend, StreamUsage, tenants
from .usage import Usage

BUDGET_FIELDS = ("min_think", "max_think", "max_waits", "wait_string", "answer_prefix", "adaptive")
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "seed", "max_tokens", "stop", "stop_token_ids",
                   "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p")
# OpenAI fields we do not implement, with the values that ask for nothing (what frameworks such as
# LangChain, LiteLLM and evaluation harnesses send by default). Any other value is a 400 naming it.
NEUTRAL = {
    "response_format": ({"type": "text"}, None), "tools": ([], None), "tool_choice": ("none", "auto", None),
    "parallel_tool_calls": (True, False, None), "store": (False, None), "service_tier": ("auto", "default", None),
    "modalities": (["text"], None), "prediction": (None,), "audio": (None,), "web_search_options": (None,),
    "functions": ([], None), "function_call": ("none", "auto", None), "verbosity": ("medium", None),
    "echo": (False, None), "best_of": (1, None), "suffix": (None, ""),  # completions
}
# Accepted whatever they hold: they change nothing here (prefix caching is automatic).
FREE_FORM = {"metadata", "user", "safety_identifier", "prompt_cache_key", "prompt_cache_retention"}
KNOWN = {"model", "prompt", "messages", "stream", "stream_options", "n", "vote", "request_id", "logit_bias", "logprobs", "top_logprobs",
         *SAMPLING_FIELDS, *BUDGET_FIELDS, *NEUTRAL, *FREE_FORM,
         "max_completion_tokens", "chat_template_kwargs", "reasoning_effort"}
OPEN_PATHS = ("/health", "/metrics")
OWNER = web.RequestKey("owner", str)  # the caller's tenant (its API key's), set by the auth middleware
logger = logging.getLogger(__name__)


def error_response(status: int, message: str, kind: str, param: str | None = None,
                   headers: dict | None = None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return web.json_response(body, status=status, headers=headers)


def to_http_error(exc: Exception) -> web.Response:
    if isinstance(exc, InvalidRequestError):
        return error_response(400, str(exc), "invalid_request_error", exc.field)
    if isinstance(exc, OverloadedError):
        return error_response(429, str(exc), "rate_limit_error", headers={"Retry-After": f"{exc.retry_after_s:g}"})
    if isinstance(exc, UnavailableError):
        return error_response(503, str(exc), "service_unavailable", headers={"Retry-After": "1"})
    if isinstance(exc, RequestNotFoundError):
        return error_response(404, f"request_id: {exc.args[0]!r} is not a finished request", "not_found_error", "request_id")
    return error_response(500, f"{type(exc).__name__}: {exc}", "server_error")


def _is_neutral(value, allowed: tuple) -> bool:
    """`value` is one of `allowed` (0 and 0.0 alike, but False is not 0)."""
    return any(value == a and (type(value) is type(a) or {type(value), type(a)} <= {int, float}) for a in allowed)


async def read_json(request: web.Request):
    """The body as JSON, or a 400 naming what is wrong with it (never a 500)."""
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidRequestError("body", "is not valid JSON") from None
    except RecursionError:
        raise InvalidRequestError("body", "is nested too deeply") from None
    except LookupError:
        raise InvalidRequestError("body", f"has an unknown charset {request.charset!r}") from None


def usage_json(u: Usage) -> dict:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
        "completion_tokens_details": {"reasoning_tokens": u.think_tokens},
        "num_waits": u.num_waits,
        "think_end_forced": u.think_end_forced,
        # Test-time scaling: probe tokens are generated but in no choice (a request costs both).
        "num_samples": u.num_samples,
        "num_probes": u.num_probes,
        "probe_tokens": u.probe_tokens,
        "think_converged": u.think_converged,
    }


class HttpFront:
    def __init__(self, frontend: Frontend, api_keys: list[str] | None = None):
        self.frontend = frontend
        self.tenants = tenants(api_keys)
        self.ready = False  # /health answers 503 until the engine is warmed up
        self.app = web.Application(middlewares=[self._errors_and_auth], client_max_size=64 * 2**20)
        self.app.add_routes([
            web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat_completions),
            web.get("/v1/models", self.models),
            web.post("/v1/feedback", self.feedback),
            web.get("/health", self.health),
            web.get("/metrics", self.metrics),
        ])

    @web.middleware
    async def _errors_and_auth(self, request: web.Request, handler):
        request[OWNER] = ""
        if self.tenants and not request.path.startswith(OPEN_PATHS):
            owner = self.tenants.get(request.headers.get("Authorization", ""))
            if owner is None:
                return error_response(401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error")
            request[OWNER] = owner
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status == 404:
                return error_response(404, f"no route {request.method} {request.path}", "not_found_error")
            if exc.status == 405:
                return error_response(405, f"{request.method} is not allowed on {request.path}", "invalid_request_error")
            raise
        except S1ServeError as exc:
            return to_http_error(exc)

    async def _body(self, request: web.Request) -> dict:
        body = await read_json(request)
        if not isinstance(body, dict):
            raise InvalidRequestError("body", "must be a JSON object")
        unknown = sorted(set(body) - KNOWN)
        if unknown:
            raise InvalidRequestError(unknown[0], "is not a supported field")
        for name, neutral in NEUTRAL.items():
            if name in body and not _is_neutral(body[name], neutral):
                raise InvalidRequestError(name, f"is not implemented; only {', '.join(json.dumps(v) for v in neutral)} accepted")
        model = body.get("model")
        if model not in (None, self.frontend.model_name):
            raise InvalidRequestError("model", f"{model!r} is not served here; this server serves {self.frontend.model_name!r}")
        if not isinstance(body.get("stream", False), bool):
            raise InvalidRequestError("stream", "must be a boolean")
        options = body.get("stream_options")
        if options is not None and not (isinstance(options, dict) and isinstance(options.get("include_usage", False), bool)):
            raise InvalidRequestError("stream_options", 'must be an object like {"include_usage": true}')
        return body

    def _parse(self, body: dict, kind: str, prefix: str, owner: str):
        sampling = {k: body[k] for k in SAMPLING_FIELDS if body.get(k) is not None}
        if body.get("max_completion_tokens") is not None:
            sampling["max_tokens"] = body["max_completion_tokens"]
        if body.get("logit_bias") is not None:
            sampling["logit_bias"] = body["logit_bias"]
        sampling["logprobs"] = self._logprobs(body, kind)
        sampling["n"] = body.get("n")
        sampling["vote"] = body.get("vote")
        budget = {k: body[k] for k in BUDGET_FIELDS if k in body}
        request_id = body.get("request_id") or f"{prefix}-{uuid.uuid4().hex[:24]}"
        common = dict(request_id=request_id, owner=owner, budget=budget or None, reasoning_effort=body.get("reasoning_effort"),
                      chat_template_kwargs=body.get("chat_template_kwargs"), **sampling)
        if kind == "chat":
            if "messages" not in body:
                raise InvalidRequestError("messages", "is required")
            return self.frontend.parse(messages=body["messages"], **common)
        if "prompt" not in body:
            raise InvalidRequestError("prompt", "is required")
        return self.frontend.parse(prompt=body["prompt"], **common)

    @staticmethod
    def _logprobs(body: dict, kind: str) -> int | None:
        """How many alternatives per token, or None: chat asks with `logprobs: true` and
        `top_logprobs: k`, completions with `logprobs: k` (OpenAI's two forms)."""
        logprobs, top = body.get("logprobs"), body.get("top_logprobs")
        if kind != "chat":
            if top is not None:
                raise InvalidRequestError("top_logprobs", "is a chat completions field; completions take logprobs: k")
            if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)):
                raise InvalidRequestError("logprobs", f"must be an integer (the alternatives per token), got {logprobs!r}")
            return logprobs
        if logprobs is not None and not isinstance(logprobs, bool):
            raise InvalidRequestError("logprobs", f"must be a boolean, got {logprobs!r}")
        if top is not None and not logprobs:
            raise InvalidRequestError("top_logprobs", "needs logprobs: true")
        if top is not None and (isinstance(top, bool) or not isinstance(top, int)):
            raise InvalidRequestError("top_logprobs", f"must be an integer, got {top!r}")
        return (top or 0) if logprobs else None

    def _logprob_entries(self, token_ids: list[int], logprobs: list) -> list[dict]:
        """Chat's `logprobs.content` items; a forced token has logprob null and `forced: true`."""
        engine = self.frontend.llm.engine
        entries = []
        for token, lp in zip(token_ids, logprobs):
            text = engine.token_text(token)
            entry = {"token": text, "logprob": None, "bytes": list(text.encode()), "top_logprobs": []}
            if lp is None:
                entry["forced"] = True
            else:
                entry["logprob"] = lp.logprob
                entry["top_logprobs"] = [{"token": (t := engine.token_text(i)), "logprob": v, "bytes": list(t.encode())}
                                         for i, v in lp.top]
            entries.append(entry)
        return entries

    @staticmethod
    def _completion_logprobs(entries: list[dict], offset: int) -> dict:
        """The legacy completions form of the same entries; offsets count from `offset`."""
        offsets = []
        for e in entries:
            offsets.append(offset)
            offset += len(e["token"])
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} if e["logprob"] is not None else None
                                 for e in entries], "text_offset": offsets}

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "text_completion")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "chat.completion")

    async def _serve(self, request: web.Request, obj: str) -> web.StreamResponse:
        body = await self._body(request)
        chat = obj == "chat.completion"
        # Rendering and size checks off the event loop: a huge prompt must not stall other streams.
        req = await asyncio.to_thread(self._parse, body, "chat" if chat else "text", "chatcmpl" if chat else "cmpl",
                                      request[OWNER])
        budgeted = req.budget is not None
        usage = StreamUsage()
        created = int(time.time())
        model = self.frontend.model_name
        stream = self.frontend.stream(req, usage)
        wants_logprobs = req.sampling.logprobs is not None

        def logprobs_json(token_ids: list[int], logprobs: list, offset: int = 0) -> dict | None:
            if not wants_logprobs:
                return None
            entries = self._logprob_entries(token_ids, logprobs)
            return {"content": entries} if chat else self._completion_logprobs(entries, offset)

        if not body.get("stream"):
            samples: dict[int, dict] = {}
            async for delta in stream:
                s = samples.setdefault(delta.index, {"think": [], "answer": [], "text": [], "logprobs": []})
                s["think"].append(delta.think_text)
                s["answer"].append(delta.answer_text)
                s["text"].append(delta.new_text)
                s["logprobs"] += delta.logprobs
            choices, contents = [], []
            for index, s in sorted(samples.items()):
                content = "".join(s["answer"]) if budgeted else "".join(s["text"])
                reasoning = "".join(s["think"]) if budgeted else None
                contents.append(content)
                lp = logprobs_json(usage.samples[index].token_ids, s["logprobs"])
                finish = usage.samples[index].finish_reason
                if chat:
                    message = {"role": "assistant", "content": content, "reasoning_content": reasoning, "reasoning": reasoning}
                    choices.append({"index": index, "message": message, "logprobs": lp, "finish_reason": finish})
                else:
                    choices.append({"index": index, "text": content, "reasoning_content": reasoning, "reasoning": reasoning,
                                    "logprobs": lp, "finish_reason": finish})
            reply = {"id": req.request_id, "object": obj, "created": created, "model": model,
                     "choices": choices, "usage": usage_json(usage)}
            if req.vote:
                reply["vote"] = dataclasses.asdict(await self.frontend.vote(req, contents))
            return web.json_response(reply)

        # SSE. The first delta is awaited before the headers go out, so a request the engine
        # rejects still gets a plain 400/429 instead of a broken stream.
        iterator = stream.__aiter__()
        try:
            first = await iterator.__anext__()
        except StopAsyncIteration:
            first = None
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def send(choice: dict, extra: dict | None = None) -> None:
            payload = {"id": req.request_id, "object": chunk_obj, "created": created, "model": model,
                       "choices": [choice] if choice else [], **(extra or {})}
            await response.write(f"data: {json.dumps(payload)}\n\n".encode())

        async def deltas():
            if first is not None:
                yield first
            async for d in iterator:
                yield d

        # Per sample: logprobs of tokens whose text has not gone out yet travel with its next chunk.
        pending: dict[int, tuple[list[int], list]] = {}
        text_offset: dict[int, int] = {}
        contents: dict[int, list[str]] = {}

        async def send_text(index: int, reasoning: str, content: str, finish: str | None) -> None:
            ids, logprobs = pending.pop(index, ([], []))
            lp = logprobs_json(ids, logprobs, text_offset.get(index, 0))
            if lp is not None and not chat:
                text_offset[index] = text_offset.get(index, 0) + sum(map(len, lp["tokens"]))
            if chat:
                delta = {"reasoning_content": reasoning, "reasoning": reasoning} if reasoning else {"content": content}
                await send({"index": index, "delta": delta if reasoning or content else {}, "logprobs": lp, "finish_reason": finish})
            else:
                await send({"index": index, "text": content, "reasoning_content": reasoning or None,
                            "reasoning": reasoning or None, "logprobs": lp, "finish_reason": finish})

        try:
            if chat:
                for index in range(req.sampling.n):
                    await send({"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
            async for d in deltas():
                ids, logprobs = pending.setdefault(d.index, ([], []))
                ids.extend(d.new_token_ids)
                logprobs.extend(d.logprobs)
                content = d.answer_text if budgeted else d.new_text
                contents.setdefault(d.index, []).append(content)
                reasoning = d.think_text if budgeted else ""
                finish = d.finish_reason if d.finished else None
                # A chunk carries reasoning or content, never both (a step may span the phase change).
                if reasoning:
                    await send_text(d.index, reasoning, "", None if content else finish)
                if content or (finish and not reasoning):
                    await send_text(d.index, "", content, finish)
            if req.vote:  # after every sample's end: the majority answer
                vote = await self.frontend.vote(req, ["".join(contents.get(i, [])) for i in range(req.sampling.n)])
                await send({}, {"vote": dataclasses.asdict(vote)})
            if include_usage:
                await send({}, {"usage": usage_json(usage)})
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:  # the client left mid-stream
            logger.info("client of %s disconnected; request aborted", req.request_id)
        finally:
            await iterator.aclose()  # a stream left early aborts its request (AsyncLLM.generate)
        return response

    async def models(self, request: web.Request) -> web.Response:
        engine = self.frontend.llm.engine
        return web.json_response({"object": "list", "data": [{
            "id": self.frontend.model_name, "object": "model", "created": 0, "owned_by": "s1serve",
            "max_model_len": engine.max_model_len,
            "think_template": engine.think_template.name if engine.think_template else None,
        }]})

    async def feedback(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        if not isinstance(body, dict) or not isinstance(body.get("request_id"), str):
            raise InvalidRequestError("request_id", "is required")
        outcome = body.get("outcome")
        if outcome not in ("correct", "incorrect"):
            raise InvalidRequestError("outcome", "must be 'correct' or 'incorrect'")
        score = body.get("score")
        if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
            raise InvalidRequestError("score", "must be a number")
        self.frontend.feedback(body["request_id"], outcome == "correct", score, request[OWNER])
        return web.json_response({})

    async def health(self, request: web.Request) -> web.Response:
        if not self.ready:
            return web.json_response({"status": "starting"}, status=503)
        if not self.frontend.llm.healthy():
            return web.json_response({"status": "engine stopped" if self.frontend.llm.error else "engine stalled"}, status=503)
        return web.json_response({"status": "ok"})

    async def metrics(self, request: web.Request) -> web.Response:
        self.frontend.load()  # refresh the gauges
        return web.Response(body=generate_latest(self.frontend.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})
