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

    def reply(self, thinking: str, attempt: str) -> str:
        """The assistant turn a trained model writes, in the form budget forcing expects. For s1:
        `<|im_start|>think\n{thinking}\n<|im_start|>answer\nAnswer: {attempt}`."""
        return f"{self.think_start}{thinking}\n{self.think_end}{self.answer_prefix} {attempt}"


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


def require_representable(template: ThinkTemplate, tokenizer) -> None:
    """Refuse a template whose delimiter the tokenizer cannot write as a token of its own: the
    engine catches the end of thinking by the first token of `think_end`, so that token must be
    an added (special) token, not a piece of ordinary text."""
    ids = tokenizer.encode(template.think_end, add_special_tokens=False)
    marker = tokenizer.convert_ids_to_tokens(ids[0]) if ids else None
    if marker not in tokenizer.get_added_vocab():
        raise InvalidRequestError(
            "think_template",
            f"the tokenizer has no token of its own for the start of {template.name!r}'s delimiter {template.think_end!r}"
            f" (it becomes {tokenizer.convert_ids_to_tokens(ids)}); pick the other template or add the token",
        )


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """Messages rendered with the model's chat template and opened for the assistant's reply:
    what the server answers and what the trainer computes no loss on."""
    if not tokenizer.chat_template:
        raise InvalidRequestError("messages", "this model has no chat template; send a prompt instead")
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # jinja raises on malformed messages
        raise InvalidRequestError("messages", f"cannot be rendered with the chat template: {exc}") from exc


def assistant_turn_end(tokenizer) -> str:
    """What the chat template writes after an assistant message (`<|im_end|>` for ChatML), without
    trailing whitespace; the tokenizer's EOS when the template writes nothing there."""
    sentinel = "\x00s1serve-reply\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": sentinel}], tokenize=False
    )
    end = text.split(sentinel, 1)[1].rstrip() if sentinel in text else ""
    return end or tokenizer.eos_token


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
