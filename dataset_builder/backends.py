"""Models the pipeline asks: our own engine in-process, or any OpenAI-compatible chat endpoint
(a running `s1serve serve`, vLLM, a hosted API). Solvers, the teacher, the LLM judge and the LLM
domain classifier all use this one interface. A failed request comes back as a `Reply` with an
`error`, after retries, so a stage can record it instead of losing the item."""

import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tqdm import tqdm

from server.errors import InvalidConfigError

Messages = list[dict]


@dataclass
class Reply:
    content: str = ""
    reasoning: str = ""  # the thinking (engine think phase, or the endpoint's reasoning_content)
    error: str = ""


class EngineBackend:
    """Our `LLM` on a model directory ("default": the embedded model), greedy, one batch per call."""

    def __init__(self, model: str = "default", max_tokens: int = 512, max_think: int | None = None,
                 min_think: int | None = None, **engine_config):
        from server.engine import LLM

        if model == "default":
            from server.models.default_model import default_model_dir

            model = str(default_model_dir())
        self.model_dir = model
        self.name = f"engine:{model}"
        self.max_tokens, self.max_think, self.min_think = max_tokens, max_think, min_think
        self.llm = LLM(model, **engine_config)

    def chat(self, conversations: list[Messages], progress: str | None = None) -> list[Reply]:
        from server.engine import SamplingParams, ThinkBudget

        # s1 budget forcing on the teacher: min_think appends "Wait" when it stops thinking early.
        budget = ThinkBudget(min_think=self.min_think, max_think=self.max_think) if self.max_think else None
        if budget is not None and self.llm.engine.think_template is None:
            budget = None  # a model without a think template answers directly
        sampling = SamplingParams(temperature=0.0, max_tokens=self.max_tokens + (self.max_think or 0))
        outputs = self.llm.chat(conversations, sampling, budget, progress=progress)
        if budget is None:
            return [Reply(content=o.text) for o in outputs]
        return [Reply(content=self._attempt(o.answer_text), reasoning=o.think_text) for o in outputs]

    def _attempt(self, answer_text: str) -> str:
        """The answer without the prefix forced at the cut ("Final Answer:") or the one a trained
        model writes ("Answer:"): the trainer renders its own."""
        text, template = answer_text.strip(), self.llm.engine.think_template
        for prefix in (template.answer_prefix.strip(), template.reply_prefix.strip()):
            if prefix and text.startswith(prefix):
                return text[len(prefix):].strip()
        return text


class EndpointBackend:
    """POST /v1/chat/completions, `concurrency` requests at a time, `retries` retries with backoff."""

    def __init__(self, endpoint: str, model: str = "", api_key_env: str = "", max_tokens: int = 512,
                 max_think: int | None = None, min_think: int | None = None, concurrency: int = 8, retries: int = 2,
                 timeout_s: float = 600.0):
        self.url = endpoint.rstrip("/") + ("" if endpoint.rstrip("/").endswith("/chat/completions") else "/chat/completions")
        self.model, self.name = model, f"endpoint:{endpoint}:{model}"
        self.api_key = os.environ.get(api_key_env, "") if api_key_env else ""
        if api_key_env and not self.api_key:
            raise InvalidConfigError(f"api_key_env: the environment variable {api_key_env} is not set")
        self.max_tokens, self.max_think, self.min_think = max_tokens, max_think, min_think
        self.concurrency, self.retries, self.timeout_s = concurrency, retries, timeout_s

    def _one(self, messages: Messages) -> Reply:
        # max_tokens counts thinking too (OpenAI, vLLM, s1serve): the answer's room comes on top of the budget.
        body = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens + (self.max_think or 0),
                "temperature": 0.0}
        for name in ("max_think", "min_think"):  # s1serve's budget fields; other servers ignore them
            if getattr(self, name):
                body[name] = getattr(self, name)
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(2.0**attempt * 0.25, 8.0))
            request = urllib.request.Request(self.url, json.dumps(body).encode(), headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    message = json.loads(response.read())["choices"][0]["message"]
                return Reply(content=message.get("content") or "", reasoning=message.get("reasoning_content") or "")
            except urllib.error.HTTPError as exc:
                error = f"HTTP {exc.code}: {exc.read()[:200].decode(errors='replace')}"
                if exc.code < 500 and exc.code != 429:
                    break  # a bad request does not get better by retrying
            except (urllib.error.URLError, TimeoutError, OSError, KeyError, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}"
        return Reply(error=error)

    def chat(self, conversations: list[Messages], progress: str | None = None) -> list[Reply]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            replies = pool.map(self._one, conversations)
            return list(tqdm(replies, total=len(conversations), desc=progress, unit="req", disable=not progress))


def make_backend(spec: dict):
    """A backend from a config mapping: `{engine: DIR, ...}`, `{endpoint: URL, model: NAME, ...}`
    or `{procedural: arithmetic, slip_rate: ...}` (the offline teacher)."""
    spec = dict(spec)
    try:
        if "procedural" in spec:
            from .procedural_teacher import ProceduralTeacher

            return ProceduralTeacher(spec.pop("procedural"), **spec)
        if "engine" in spec:
            return EngineBackend(spec.pop("engine"), **spec)
        if "endpoint" in spec:
            return EndpointBackend(spec.pop("endpoint"), **spec)
    except TypeError as exc:
        raise InvalidConfigError(f"backend {spec}: {exc}") from exc
    raise InvalidConfigError(f"backend: expected an `engine:` or `endpoint:` key, got {sorted(spec)}")
