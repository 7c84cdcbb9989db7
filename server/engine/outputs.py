"""What the engine hands back: a delta per request per step, and the finished request.

Deltas are what streaming fronts forward; `RequestOutput` is their sum (the offline `LLM` builds
it the same way a streaming client would, so both paths are one path).
"""

from dataclasses import dataclass, field


@dataclass
class StepOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str  # stop-string-safe: a possible stop-string prefix is held back until resolved
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" once finished
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens served from the prefix cache


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)  # every generated token, in order
    text: str = ""
    finish_reason: str | None = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, delta: StepOutput) -> None:
        self.token_ids += delta.new_token_ids
        self.text += delta.new_text
        self.num_cached_tokens = delta.num_cached_tokens
        if delta.finished:
            self.finish_reason = delta.finish_reason
