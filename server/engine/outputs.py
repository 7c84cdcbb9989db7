"""What the engine hands back: a delta per request per step, and the finished request.

Deltas are what streaming fronts forward; `RequestOutput` is their sum (the offline `LLM` builds
it the same way a streaming client would, so both paths are one path).
"""

from dataclasses import dataclass, field


@dataclass
class TokenLogprobs:
    """One sampled token's log-probability and the k most likely tokens at its position."""

    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass
class StepOutput:
    request_id: str
    new_token_ids: list[int]  # sampled and forced tokens alike, in order
    forced: list[bool]  # per new token: True when the engine forced it (Wait, delimiter, answer prefix)
    new_text: str  # thinking, delimiter and answer text, in order; an answer's possible stop-string prefix is held back
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" once finished
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    # Phase-tagged views of new_text (the think_end delimiter belongs to neither) and what the
    # engine did this step ("WAIT_INSERTED", "THINK_END_FORCED"). Running totals follow.
    think_text: str = ""
    answer_text: str = ""
    events: list[str] = field(default_factory=list)
    phase: str = "answer"  # the phase the request is in after this step: "think" | "answer"
    think_tokens: int = 0
    answer_tokens: int = 0
    num_waits: int = 0
    think_end_forced: bool = False
    # Per new token when the request asked for logprobs (None for a forced token); else empty.
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    index: int = 0  # the sample (n > 1); `finished` is this sample's, `request_finished` all samples'
    request_finished: bool = False
    num_probes: int = 0  # adaptive thinking: probes run so far, the tokens they generated,
    probe_tokens: int = 0  # and whether their agreement ended thinking
    converged: bool = False


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)  # every generated token, forced ones included
    forced: list[bool] = field(default_factory=list)  # per token: forced by the engine, not sampled
    text: str = ""  # think_text + the delimiter as written + answer_text
    think_text: str = ""
    answer_text: str = ""
    think_tokens: int = 0
    answer_tokens: int = 0
    num_waits: int = 0
    think_end_forced: bool = False
    events: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)  # per token, when asked for
    index: int = 0
    num_probes: int = 0
    probe_tokens: int = 0
    converged: bool = False
    # n > 1: every sample's output by index (this one first); empty for a single sample.
    samples: list["RequestOutput"] = field(default_factory=list, repr=False)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, delta: StepOutput) -> None:
        self.token_ids += delta.new_token_ids
        self.forced += delta.forced
        self.text += delta.new_text
        self.think_text += delta.think_text
        self.answer_text += delta.answer_text
        self.events += delta.events
        self.logprobs += delta.logprobs
        self.think_tokens, self.answer_tokens = delta.think_tokens, delta.answer_tokens
        self.num_waits, self.think_end_forced = delta.num_waits, delta.think_end_forced
        self.num_cached_tokens = delta.num_cached_tokens
        self.index, self.num_probes, self.probe_tokens, self.converged = delta.index, delta.num_probes, delta.probe_tokens, delta.converged
        if delta.finished:
            self.finish_reason = delta.finish_reason
