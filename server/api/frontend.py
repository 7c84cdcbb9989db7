"""What the gRPC and REST fronts share: request validation, admission, the stream with its
metrics and log line, feedback, and the load report. Nothing invalid reaches the engine: every
field is checked here or in `LLMEngine.make_sequence` (called before the request is queued)."""

import asyncio
import hashlib
import logging
import math
import time
import uuid
from collections import OrderedDict
from contextlib import aclosing
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ..answers import METHODS as ANSWER_METHODS
from ..answers import Vote, majority
from ..engine import AdaptiveThinking, AsyncLLM, SamplingParams, StepOutput, ThinkBudget
from ..engine.params import MAX_SAMPLES
from ..errors import InvalidRequestError, OverloadedError, RequestNotFoundError, UnavailableError
from .metrics import Metrics, think_bucket
from .usage import Usage

logger = logging.getLogger("s1serve.requests")

Prompt = str | list[int]


@dataclass
class ParsedRequest:
    request_id: str  # as the client sees it
    prompt: Prompt
    sampling: SamplingParams
    budget: ThinkBudget | None
    owner: str = ""  # the API key's tenant ("" without keys)
    vote: str | None = None  # n > 1: aggregate the samples' answers by this extraction method

    @property
    def engine_id(self) -> str:
        return engine_id(self.owner, self.request_id)


def owner_of(api_key: str) -> str:
    """A tenant name for an API key that reveals nothing about the key (it reaches logs and ids)."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:12]


def tenants(api_keys: list[str] | None) -> dict[str, str]:
    """What both fronts authenticate with: an `Authorization` header value -> its tenant."""
    return {f"Bearer {k}": owner_of(k) for k in api_keys or ()}


def engine_id(owner: str, request_id: str) -> str:
    """The engine's id for a client's request: per tenant, so tenants' ids never collide."""
    return f"{owner}/{request_id}" if owner else request_id


@dataclass
class StreamUsage(Usage):
    """Usage plus the generated token ids, accumulated while a request streams. With n > 1 the
    counts are summed over the samples, `token_ids` are sample 0's and `samples` holds each one's."""

    token_ids: list[int] = field(default_factory=list)
    samples: dict[int, "StreamUsage"] = field(default_factory=dict)

    SUMMED = ("think_tokens", "answer_tokens", "completion_tokens", "num_waits", "num_probes", "probe_tokens",
              "think_converged")

    def add(self, delta: StepOutput, n: int) -> None:
        """Fold one delta in: its sample's running totals, then the request's sums."""
        s = self.samples.setdefault(delta.index, StreamUsage())
        s.token_ids += delta.new_token_ids
        s.think_tokens, s.answer_tokens = delta.think_tokens, delta.answer_tokens
        s.num_waits, s.think_end_forced = delta.num_waits, delta.think_end_forced
        s.num_probes, s.probe_tokens, s.think_converged = delta.num_probes, delta.probe_tokens, int(delta.converged)
        s.completion_tokens = len(s.token_ids)
        s.finish_reason = delta.finish_reason or ""
        s.prompt_tokens, s.cached_prompt_tokens = delta.num_prompt_tokens, delta.num_cached_tokens
        self.prompt_tokens, self.cached_prompt_tokens = delta.num_prompt_tokens, delta.num_cached_tokens
        for name in self.SUMMED:
            setattr(self, name, sum(getattr(x, name) for x in self.samples.values()))
        self.think_end_forced = any(x.think_end_forced for x in self.samples.values())
        self.token_ids = self.samples[0].token_ids if 0 in self.samples else []
        self.num_samples = n
        if delta.request_finished:  # the request's reason: the worst of its samples'
            reasons = {x.finish_reason for x in self.samples.values()}
            self.finish_reason = next((r for r in ("abort", "length", "stop") if r in reasons), "")


# Bounds on what a request may carry, checked before anything is tokenized.
MAX_INT = 2**31 - 1  # token counts and ids are int32 on the wire
MAX_STOPS, MAX_STRING_CHARS = 64, 512  # stop strings; and each of them, wait_string, answer_prefix
MAX_REQUEST_ID_CHARS = 128


def _int_field(name: str, value, minimum: int = 0, maximum: int = MAX_INT) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(name, f"must be an integer, got {value!r}")
    if not minimum <= value <= maximum:
        raise InvalidRequestError(name, f"must be in [{minimum}, {maximum}], got {value}")
    return value


def _float_field(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequestError(name, f"must be a finite number, got {value!r}")
    return float(value)


def _string_field(name: str, value, max_chars: int = MAX_STRING_CHARS) -> str:
    if not isinstance(value, str):
        raise InvalidRequestError(name, f"must be a string, got {type(value).__name__}")
    if len(value) > max_chars:
        raise InvalidRequestError(name, f"has {len(value):,} characters; at most {max_chars:,}")
    return value


def _logit_bias(value) -> dict[int, float]:
    """OpenAI's form: token ids (JSON object keys are strings) -> a bias in [-100, 100]."""
    if not isinstance(value, dict) or len(value) > 1024:
        raise InvalidRequestError("logit_bias", "must be an object of at most 1024 token ids -> bias")
    bias = {}
    for key, b in value.items():
        token = int(key) if isinstance(key, str) and key.isdigit() else key
        bias[_int_field("logit_bias", token)] = _float_field("logit_bias", b)
    return bias


def _adaptive(value) -> AdaptiveThinking | None:
    """`true` (the defaults), `false`, or an object with any of every / agree / probe_tokens / method."""
    if value is False:
        return None
    if value is True:
        return AdaptiveThinking()
    fields = {"every", "agree", "probe_tokens", "method"}
    if not isinstance(value, dict) or set(value) - fields:
        raise InvalidRequestError("adaptive", f"must be true or an object with {', '.join(sorted(fields))}")
    kwargs = {k: _int_field(f"adaptive.{k}", value[k], 1) for k in ("every", "agree", "probe_tokens") if value.get(k) is not None}
    if value.get("method") is not None:
        kwargs["method"] = _string_field("adaptive.method", value["method"])
    return AdaptiveThinking(**kwargs)


def check_request_id(request_id) -> str:
    """Client ids reach logs and metrics: printable ASCII without spaces, bounded."""
    _string_field("request_id", request_id, MAX_REQUEST_ID_CHARS)
    if not all(33 <= ord(c) < 127 for c in request_id):
        raise InvalidRequestError("request_id", "may hold printable ASCII characters only (no spaces or control characters)")
    return request_id


class Frontend:
    def __init__(self, llm: AsyncLLM, model_name: str, max_waiting: int = 256,
                 reasoning_efforts: dict[str, int] | None = None, max_prompt_chars: int = 1_000_000,
                 feedback_memory: int = 100_000):
        self.llm = llm
        self.max_prompt_chars = max_prompt_chars  # prompt or messages, before tokenization
        self.model_name = model_name
        self.max_waiting = max_waiting
        self.reasoning_efforts = reasoning_efforts or {}  # OpenAI's reasoning_effort -> max_think
        self.draining = False  # set by the drain: new work gets UNAVAILABLE / 503, not "overloaded"
        self.metrics = Metrics(model_name)
        # request id -> think tokens of finished requests, for feedback bucketing (bounded)
        self._finished: OrderedDict[str, int] = OrderedDict()
        self._feedback_memory = feedback_memory

    # ---- validation -----------------------------------------------------------------------------
    def parse(
        self, *, request_id: str = "", prompt: Prompt | None = None, messages: list[dict] | None = None,
        temperature=None, top_p=None, top_k=None, seed=None, max_tokens=None, stop=None, stop_token_ids=None,
        logit_bias: dict | None = None, presence_penalty=None, frequency_penalty=None, repetition_penalty=None,
        min_p=None, logprobs: int | None = None, n=None, vote: str | None = None,
        budget: dict | None = None, chat_template_kwargs: dict | None = None, reasoning_effort: str | None = None,
        owner: str = "",
    ) -> ParsedRequest:
        """Turn API fields into engine parameters; raises InvalidRequestError naming the field.
        Sizes are checked before anything is tokenized; the fronts call this off the event loop."""
        if request_id:
            check_request_id(request_id)
        if prompt is not None and messages is not None:
            raise InvalidRequestError("prompt", "give either prompt or messages, not both")
        if chat_template_kwargs is not None and messages is None:
            raise InvalidRequestError("chat_template_kwargs", "applies to messages only")
        if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
            raise InvalidRequestError("chat_template_kwargs", "must be an object")
        if messages is not None:
            messages = self._check_messages(messages)
            size = sum(len(m["content"]) for m in messages)
            if size > self.max_prompt_chars:
                raise InvalidRequestError("messages", f"hold {size:,} characters; at most {self.max_prompt_chars:,} (--max-prompt-chars)")
            prompt = self.llm.engine.render_chat(messages, chat_template_kwargs)
        elif prompt is None:
            raise InvalidRequestError("prompt", "is required (or messages)")
        elif not isinstance(prompt, str) and not (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)):
            raise InvalidRequestError("prompt", "must be a string or a list of token ids")
        elif len(prompt) > self.max_prompt_chars:
            raise InvalidRequestError("prompt", f"has {len(prompt):,} characters or tokens; at most {self.max_prompt_chars:,} (--max-prompt-chars)")
        kwargs = {}
        if temperature is not None:
            kwargs["temperature"] = _float_field("temperature", temperature)
        if top_p is not None:
            kwargs["top_p"] = _float_field("top_p", top_p)
        if top_k is not None:
            kwargs["top_k"] = _int_field("top_k", top_k)
        if seed is not None:
            kwargs["seed"] = _int_field("seed", seed)
        if max_tokens is not None:
            kwargs["max_tokens"] = _int_field("max_tokens", max_tokens, 1)
        if stop is not None:
            stop = [stop] if isinstance(stop, str) else stop
            if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
                raise InvalidRequestError("stop", "must be a string or a list of strings")
            if len(stop) > MAX_STOPS:
                raise InvalidRequestError("stop", f"has {len(stop)} strings; at most {MAX_STOPS}")
            kwargs["stop"] = tuple(_string_field("stop", s) for s in stop)
        if stop_token_ids is not None:
            if not isinstance(stop_token_ids, list) or len(stop_token_ids) > MAX_STOPS:
                raise InvalidRequestError("stop_token_ids", f"must be a list of at most {MAX_STOPS} token ids")
            kwargs["stop_token_ids"] = tuple(_int_field("stop_token_ids", t) for t in stop_token_ids)
        if logit_bias is not None:
            kwargs["logit_bias"] = _logit_bias(logit_bias)
        for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty),
                            ("repetition_penalty", repetition_penalty), ("min_p", min_p)):
            if value is not None:
                kwargs[name] = _float_field(name, value)
        if logprobs is not None:
            kwargs["logprobs"] = _int_field("logprobs", logprobs)
        if n is not None:
            kwargs["n"] = _int_field("n", n, 1, MAX_SAMPLES)
        sampling = SamplingParams(**kwargs)
        if vote is not None:
            if vote not in ANSWER_METHODS:
                raise InvalidRequestError("vote", f"must be one of {', '.join(ANSWER_METHODS)}, got {vote!r}")
            if sampling.n < 2:
                raise InvalidRequestError("vote", "needs n > 1 samples to vote over")
        if reasoning_effort:
            if not isinstance(reasoning_effort, str) or reasoning_effort not in self.reasoning_efforts:
                raise InvalidRequestError("reasoning_effort", f"must be one of {', '.join(self.reasoning_efforts)}, got {reasoning_effort!r}")
            budget = dict(budget or {})
            effort = self.reasoning_efforts[reasoning_effort]
            if sampling.max_tokens is not None and self.llm.engine.think_ids is not None:
                effort = max(1, min(effort, self.llm.engine.think_room(sampling.max_tokens)))  # max_tokens bounds it, as at OpenAI
            budget["max_think"] = budget.get("max_think") or effort
        think = None
        if budget is not None:
            values = {k: _int_field(k, budget[k]) if budget.get(k) is not None else 0
                      for k in ("min_think", "max_think", "max_waits")}
            strings = {}
            for name, key, empty_is_unset in (("wait_string", "wait", True), ("answer_prefix", "answer_prefix", False)):
                value = budget.get(name)
                if value is not None:
                    _string_field(name, value)
                strings[key] = (value or None) if empty_is_unset else value
            adaptive = budget.get("adaptive")
            if adaptive is not None:
                strings["adaptive"] = _adaptive(adaptive)
            try:
                think = ThinkBudget(**{k: v or None for k, v in values.items()}, **strings)
            except InvalidRequestError as exc:
                raise _renamed(exc) from None
        return ParsedRequest(request_id or f"req-{uuid.uuid4().hex}", prompt, sampling, think, owner, vote)

    @staticmethod
    def _check_messages(messages) -> list[dict]:
        if not isinstance(messages, list) or not messages:
            raise InvalidRequestError("messages", "must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise InvalidRequestError(f"messages[{i}].role", "must be system, user or assistant")
            if not isinstance(m.get("content"), str):
                raise InvalidRequestError(f"messages[{i}].content", "must be a string")
        return [{"role": m["role"], "content": m["content"]} for m in messages]

    # ---- serving --------------------------------------------------------------------------------
    def admit(self) -> None:
        if self.draining:
            self.metrics.rejected.labels(self.model_name, "draining").inc()
            raise UnavailableError("the server is shutting down; retry on another replica")
        waiting = self.llm.num_waiting
        if waiting >= self.max_waiting:
            self.metrics.rejected.labels(self.model_name, "overloaded").inc()
            raise OverloadedError(waiting, self.max_waiting)

    async def stream(self, req: ParsedRequest, usage: StreamUsage) -> AsyncIterator[StepOutput]:
        """The request's deltas; fills `usage` as it goes and records metrics when it ends.
        Validation errors raise here, before the first delta (and before the engine sees it)."""
        self.admit()
        m, model = self.metrics, self.model_name
        start = last = time.perf_counter()
        rejected = False
        try:
            # aclosing: when our caller stops early (a client left), the engine request is aborted now.
            async with aclosing(self.llm.generate(req.prompt, req.sampling, req.engine_id, req.budget)) as deltas:
                async for delta in deltas:
                    last = self._observe(delta, req, usage, start, last)
                    yield delta
        except InvalidRequestError as exc:
            rejected = True  # make_sequence refused it: the engine never saw it
            m.rejected.labels(model, "invalid").inc()
            raise _renamed(exc) from None
        finally:
            if not rejected:
                usage.total_time_s = usage.total_time_s or time.perf_counter() - start
                usage.finish_reason = usage.finish_reason or "abort"  # the client left early
                self._record(req, usage)

    def _observe(self, delta: StepOutput, req: ParsedRequest, usage: StreamUsage, start: float, last: float) -> float:
        """Latency metrics and usage for one delta; returns when its tokens arrived (or `last`)."""
        m, model = self.metrics, self.model_name
        now = time.perf_counter()
        if delta.new_token_ids:
            if not any(x.token_ids for x in usage.samples.values()):
                usage.time_to_first_token_s = now - start
                m.ttft.labels(model).observe(now - start)
            else:
                m.itl.labels(model, delta.phase).observe(now - last)
            if delta.answer_tokens and not usage.time_to_first_answer_token_s and req.budget is not None:
                usage.time_to_first_answer_token_s = now - start
                m.ttfat.labels(model).observe(now - start)
            last = now
        usage.add(delta, req.sampling.n)
        if delta.finished:
            usage.samples[delta.index].total_time_s = now - start
        if delta.request_finished:  # before the last delta goes out: the fronts copy usage from it
            usage.total_time_s = now - start
        return last

    def _record(self, req: ParsedRequest, usage: StreamUsage) -> None:
        m, model = self.metrics, self.model_name
        m.requests.labels(model, usage.finish_reason, str(req.budget is not None).lower()).inc()
        m.prompt_tokens.labels(model).inc(usage.prompt_tokens)
        m.think_tokens.labels(model).inc(usage.think_tokens)
        m.answer_tokens.labels(model).inc(usage.answer_tokens)
        m.waits.labels(model).inc(usage.num_waits)
        m.forced_ends.labels(model).inc(int(usage.think_end_forced))
        m.prompt_hist.labels(model).observe(usage.prompt_tokens)
        m.think_hist.labels(model).observe(usage.think_tokens)
        m.answer_hist.labels(model).observe(usage.answer_tokens)
        m.e2e.labels(model).observe(usage.total_time_s)
        m.samples_hist.labels(model).observe(usage.num_samples)
        m.probes.labels(model).inc(usage.num_probes)
        m.probe_tokens.labels(model).inc(usage.probe_tokens)
        m.adaptive_stops.labels(model).inc(usage.think_converged)
        self._finished[req.engine_id] = usage.think_tokens
        while len(self._finished) > self._feedback_memory:
            self._finished.popitem(last=False)
        logger.info(
            "request %s finished (%s): prompt %d, think %d, answer %d tokens, waits %d%s, %.3f s",
            req.engine_id, usage.finish_reason, usage.prompt_tokens, usage.think_tokens, usage.answer_tokens,
            usage.num_waits, ", think end forced" if usage.think_end_forced else "", usage.total_time_s,
            extra={"fields": {"request_id": req.request_id, "tenant": req.owner, "budgeted": req.budget is not None,
                              **usage.fields()}},
        )

    async def vote(self, req: ParsedRequest, texts: list[str]) -> Vote:
        """The majority answer over the samples' answers (off the event loop: math-verify is slow)."""
        vote = await asyncio.to_thread(majority, texts, req.vote)
        self.metrics.vote_agreement.labels(self.model_name).observe(vote.count / len(texts))
        return vote

    def feedback(self, request_id: str, correct: bool, score: float | None = None, owner: str = "") -> None:
        """Grade a finished request of this tenant (another tenant's request is not found)."""
        key = engine_id(owner, request_id)
        if key not in self._finished:
            raise RequestNotFoundError(request_id)
        outcome = "correct" if correct else "incorrect"
        self.metrics.feedback.labels(self.model_name, outcome, think_bucket(self._finished[key])).inc()
        logger.info("feedback for %s: %s%s", key, outcome, f" (score {score})" if score is not None else "")

    def abort(self, request_ids: list[str], owner: str = "") -> list[str]:
        """Abort this tenant's requests among `request_ids`; returns those that were running."""
        running = self.llm.engine.sequences
        aborted = [r for r in request_ids if engine_id(owner, r) in running]
        for request_id in request_ids:
            self.llm.abort(engine_id(owner, request_id))
        return aborted

    def load(self) -> dict:
        engine = self.llm.engine
        bm = engine.block_manager
        load = {
            "running": self.llm.num_running,
            "waiting": self.llm.num_waiting,
            "kv_cache_usage": bm.usage,
            "num_kv_blocks": bm.num_blocks,
            "free_kv_blocks": bm.num_free_blocks,
        }
        hit = bm.prefix_hit_tokens / bm.prefix_query_tokens if bm.prefix_query_tokens else 0.0
        self.metrics.set_load(load["running"], load["waiting"], load["kv_cache_usage"], hit,
                              engine.scheduler.num_preemptions)
        return load


def _renamed(exc: InvalidRequestError) -> InvalidRequestError:
    """ThinkBudget names its string `wait`; the APIs call it `wait_string`."""
    if exc.field == "wait":
        return InvalidRequestError("wait_string", exc.message)
    return exc
