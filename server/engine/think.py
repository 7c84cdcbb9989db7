"""s1 budget forcing: think templates and the per-sequence THINK -> ANSWER state machine.

The engine calls `ThinkState.accept(sampled)` with every token sampled for a budgeted sequence,
*before* anything is appended to the sequence, the KV cache or the stream. It returns what to
append instead, as phase-tagged segments:
- a normal thinking token is appended as is;
- the first token of `think_end` (or EOS) while `think_tokens < min_think` and Waits remain is
  discarded and the `wait` tokens are appended ("Wait": the model keeps thinking);
- the first token of `think_end` otherwise ends thinking, and the engine completes the delimiter;
  EOS in the think phase is treated the same way (the s1 loop stops thinking at EOS too and
  then asks for the answer), so a budgeted reply always reaches its answer phase;
- reaching `max_think` appends `think_end + answer_prefix` (the forced end).
Catching the delimiter at its first token means it never reaches the client or the KV cache,
so nothing is rolled back and the prompt is never re-prefilled. Forced tokens then go through the
same KV path as a prompt chunk. The semantics are DESIGN.md's "Budget forcing, precisely".
"""

from dataclasses import dataclass, field
from enum import Enum

from ..errors import InvalidRequestError
from .params import ThinkBudget


@dataclass(frozen=True)
class ThinkTemplate:
    """How a model family marks its reasoning. Strings, tokenized once per engine."""

    name: str
    think_start: str  # the assistant turn opens with it; budgeted prompts must end with it
    think_end: str  # the delimiter the model emits to stop thinking
    answer_prefix: str  # forced after a forced think_end, so the model answers instead of musing
    wait: str = "Wait"  # appended instead of a premature think_end


THINK_TEMPLATES = {
    # s1 models (Qwen2.5 ChatML): the assistant turn is `<|im_start|>think\n...<|im_start|>answer\nAnswer: ...`
    "s1": ThinkTemplate("s1", "<|im_start|>think\n", "<|im_start|>answer", "\nAnswer:"),
    # DeepSeek-R1 style: `<think>\n...</think>` then the answer.
    "r1": ThinkTemplate("r1", "<think>\n", "</think>", "\n\nFinal Answer:"),
}


def resolve_think_template(spec: "str | ThinkTemplate | None", tokenizer) -> ThinkTemplate | None:
    """A template by name, as given, or derived from the tokenizer ("auto"): R1 when `</think>` is
    one token of the vocabulary, s1 when `<|im_start|>` is. None when neither fits; such a model
    serves requests without a budget only."""
    if isinstance(spec, ThinkTemplate):
        return spec
    if spec in THINK_TEMPLATES:
        return THINK_TEMPLATES[spec]
    if spec not in (None, "auto"):
        raise InvalidRequestError("think_template", f"unknown template {spec!r}; expected one of {sorted(THINK_TEMPLATES)}")
    vocab = tokenizer.get_vocab()
    for name, marker in (("r1", "</think>"), ("s1", "<|im_start|>")):
        if marker in vocab:
            return THINK_TEMPLATES[name]
    return None


@dataclass(frozen=True)
class ThinkTokens:
    """A template's strings as token ids (tokenized without special-token decoration)."""

    think_start: tuple[int, ...]
    think_end: tuple[int, ...]
    answer_prefix: tuple[int, ...]
    wait: tuple[int, ...]

    @classmethod
    def from_template(cls, template: ThinkTemplate, tokenizer) -> "ThinkTokens":
        ids = {
            name: tuple(tokenizer.encode(getattr(template, name), add_special_tokens=False))
            for name in ("think_start", "think_end", "answer_prefix", "wait")
        }
        for name in ("think_start", "think_end", "wait"):
            if not ids[name]:
                raise InvalidRequestError("think_template", f"{name} {getattr(template, name)!r} tokenizes to nothing")
        return cls(**ids)


class Phase(str, Enum):
    THINK = "think"
    DELIMITER = "delimiter"  # think_end tokens: part of neither the thinking nor the answer
    ANSWER = "answer"


class Event(str, Enum):
    WAIT_INSERTED = "WAIT_INSERTED"
    THINK_END_FORCED = "THINK_END_FORCED"


@dataclass
class ThinkState:
    """Budget-forcing state of one sequence. It describes the tokens already appended, so it
    survives preemption (recompute re-prefills the same tokens) without any change."""

    budget: ThinkBudget
    tokens: ThinkTokens
    wait: tuple[int, ...]  # this request's wait tokens (its own string or the template's)
    phase: Phase = Phase.THINK
    think_tokens: int = 0
    num_waits: int = 0
    think_end_forced: bool = False
    events: list[Event] = field(default_factory=list)  # since the last delta

    def _may_insert_wait(self) -> bool:
        b = self.budget
        return bool(b.min_think) and self.think_tokens < b.min_think and not (b.max_waits and self.num_waits >= b.max_waits)

    def accept(self, sampled: int, is_eos: bool, room: int) -> list[tuple[Phase, list[int]]]:
        """What to append for one sampled token, as (phase, tokens) segments in order, at most
        `room` tokens in all (what max_tokens and the context leave)."""
        if self.phase is not Phase.THINK:
            return [(Phase.ANSWER, [sampled])]
        b = self.budget
        ends_thinking = sampled == self.tokens.think_end[0] or is_eos
        if ends_thinking and self._may_insert_wait():
            thinking = list(self.wait[: b.max_think - self.think_tokens] if b.max_think else self.wait)
            self.num_waits += 1
            self.events.append(Event.WAIT_INSERTED)
        elif ends_thinking:  # the model's own end (or EOS, as in the s1 loop): complete the delimiter
            self.phase = Phase.ANSWER
            return [(Phase.DELIMITER, list(self.tokens.think_end[:room]))]
        else:
            thinking = [sampled]
        thinking = thinking[:room]
        self.think_tokens += len(thinking)
        segments = [(Phase.THINK, thinking)]
        if b.max_think and self.think_tokens >= b.max_think:
            self.phase = Phase.ANSWER
            self.think_end_forced = True
            self.events.append(Event.THINK_END_FORCED)
            room -= len(thinking)
            forced = list(self.tokens.think_end + self.tokens.answer_prefix)[:room]
            end = len(self.tokens.think_end)
            segments += [(Phase.DELIMITER, forced[:end]), (Phase.ANSWER, forced[end:])]
        return segments

    def take_events(self) -> list[str]:
        events, self.events = [e.value for e in self.events], []
        return events
