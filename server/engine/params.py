"""Per-request parameters: how to sample (`SamplingParams`) and how long to think (`ThinkBudget`).

Both validate in `__post_init__` and raise `InvalidSamplingParamError` naming the field, so the
API layer can reject a request before it reaches the scheduler.
"""

from dataclasses import dataclass, field

from ..answers import METHODS
from ..errors import InvalidSamplingParamError

MAX_LOGPROBS = 20  # most likely alternatives a request may ask for per token (OpenAI's limit)
MAX_SAMPLES = 64  # n per request


@dataclass(frozen=True)
class SamplingParams:
    """OpenAI/vLLM-style sampling controls. `temperature == 0` means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    # Generated tokens in all (thinking, forced and answer tokens, as OpenAI and vLLM count them).
    # None: the engine's default_max_tokens; for a budgeted request the think limit plus the
    # delimiter, the answer prefix and default_max_tokens for the answer (LLMEngine plans it).
    max_tokens: int | None = None
    seed: int | None = None  # same seed -> same output, whatever else is in the batch
    stop: tuple[str, ...] = ()  # stop strings; the matched string is cut from the text
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # for benchmarks: generate exactly max_tokens
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added logit
    # Penalties on what was already generated (forced tokens count), as OpenAI and vLLM define them:
    # presence subtracts once per distinct token, frequency once per occurrence; repetition is the
    # HF/CTRL rule over prompt and output (a seen token's logit is divided by it when positive,
    # multiplied when negative). All three apply to greedy rows too.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0  # drop tokens whose probability is below min_p x the top token's
    # None: no logprobs. k >= 0: each sampled token's log-probability under the model's own
    # distribution (before bias, penalties and temperature, as vLLM's default) and the k most likely.
    logprobs: int | None = None
    # Samples of the request. They share the prompt's KV blocks (copy-on-write fork after its
    # prefill); sample i draws with sample_seed(seed, i), so sample 0 is the request without n.
    n: int = 1

    def __post_init__(self):
        # Accept lists from callers but store tuples so the params stay hashable-ish and immutable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "logit_bias", {int(k): float(v) for k, v in self.logit_bias.items()})
        if not self.temperature >= 0:  # also catches NaN
            raise InvalidSamplingParamError("temperature", f"must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidSamplingParamError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidSamplingParamError("top_k", f"must be >= 0 (0 disables it), got {self.top_k}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidSamplingParamError("max_tokens", f"must be >= 1, got {self.max_tokens}")
        if any(not s for s in self.stop):
            raise InvalidSamplingParamError("stop", "stop strings must be non-empty")
        if any(t < 0 for t in self.stop_token_ids):
            raise InvalidSamplingParamError("stop_token_ids", "token ids must be >= 0")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidSamplingParamError("seed", f"must be in [0, 2**63), got {self.seed}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise InvalidSamplingParamError(name, f"must be in [-2, 2], got {getattr(self, name)}")
        if not 0 < self.repetition_penalty <= 10:
            raise InvalidSamplingParamError("repetition_penalty", f"must be in (0, 10] (1 disables it), got {self.repetition_penalty}")
        if not 0 <= self.min_p <= 1:
            raise InvalidSamplingParamError("min_p", f"must be in [0, 1], got {self.min_p}")
        if not 1 <= self.n <= MAX_SAMPLES:
            raise InvalidSamplingParamError("n", f"must be in [1, {MAX_SAMPLES}], got {self.n}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidSamplingParamError("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        for token_id, bias in self.logit_bias.items():
            if token_id < 0:
                raise InvalidSamplingParamError("logit_bias", f"token id {token_id} is negative")
            if not -100 <= bias <= 100:
                raise InvalidSamplingParamError("logit_bias", f"bias {bias} for token {token_id} is outside [-100, 100]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty) or self.repetition_penalty != 1.0


@dataclass(frozen=True)
class AdaptiveThinking:
    """Stop thinking once the answer converges (Dynasor-CoT's certainty probe): every `every`
    thinking tokens the engine forks the sequence, forces the think end and answer prefix on the
    fork, decodes `probe_tokens` greedy tokens, extracts the answer (server.answers, `method`) and
    discards the fork; when the last `agree` probes gave the same non-empty answer, thinking ends
    there (forced, as at max_think). The sequence waits while its probe runs, so its tokens are
    those of the same request without probes up to the stop."""

    every: int = 64
    agree: int = 3
    probe_tokens: int = 24
    method: str = "math"

    def __post_init__(self):
        for name, low in (("every", 1), ("agree", 1), ("probe_tokens", 1)):
            if getattr(self, name) < low:
                raise InvalidSamplingParamError(f"adaptive.{name}", f"must be >= {low}, got {getattr(self, name)}")
        if self.method not in METHODS:
            raise InvalidSamplingParamError("adaptive.method", f"must be one of {', '.join(METHODS)}, got {self.method!r}")


@dataclass(frozen=True)
class ThinkBudget:
    """s1 budget forcing limits for one request; 0 or None = no constraint (as in DESIGN.md).

    `wait` replaces the template's "Wait" for this request, `answer_prefix` the text forced after
    the delimiter at the cut ("" forces the delimiter alone). Semantics: server/engine/think.py.
    """

    min_think: int | None = None
    max_think: int | None = None
    max_waits: int | None = None
    wait: str | None = None
    answer_prefix: str | None = None
    adaptive: AdaptiveThinking | None = None

    def __post_init__(self):
        for name in ("min_think", "max_think", "max_waits"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise InvalidSamplingParamError(name, f"must be >= 0, got {value}")
        if self.min_think and self.max_think and self.min_think > self.max_think:
            raise InvalidSamplingParamError("min_think", f"{self.min_think} exceeds max_think {self.max_think}")
        if self.wait is not None and not self.wait:
            raise InvalidSamplingParamError("wait", "must be non-empty")
