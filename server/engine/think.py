"""s1 budget forcing: think templates, chat rendering, and the per-sequence THINK -> ANSWER state machine.

This module owns the think/answer delimiters and chat rendering; the server, the trainer and the
dataset builder import it, so there is one definition of the format.

The engine calls `ThinkState.accept(sampled)` with every token sampled for a budgeted sequence,
*before* anything is appended to the sequence, the KV cache or the stream. It returns what to
append instead, as phase-tagged segments, each marked sampled or forced:
- a normal thinking token is appended as is;
- the first token of `think_end` (or EOS) while `think_tokens < min_think` and Waits remain is
  discarded and the `wait` tokens are appended ("Wait": the model keeps thinking);
- the first token of `think_end` otherwise ends thinking, and the engine completes the delimiter
  (a natural end stays as the model wrote it: no answer prefix);
- EOS in the think phase ends thinking too (the s1 loop stops thinking at EOS and then asks for
  the answer); the model wrote no delimiter, so the engine appends `think_end + answer_prefix`
  as at the cut, and a budgeted reply always reaches its answer phase;
- reaching the think limit appends `think_end + answer_prefix` (the forced end). The limit is
  `max_think`, or less when `max_tokens` or the context would otherwise leave the answer no room.
Catching the delimiter at its first token means it never reaches the client or the KV cache,
so nothing is rolled back and the prompt is never re-prefilled. Forced tokens then go through the
same KV path as a prompt chunk. Once in the answer phase nothing re-arms the think phase: a think
opener the model writes there is answer text. The semantics are DESIGN.md's "Budget forcing, precisely".
"""

from dataclasses import dataclass, field
from enum import Enum

from ..answers import same
from ..errors import InvalidConfigError, InvalidRequestError
from .params import ThinkBudget


@dataclass(frozen=True)
class ThinkTemplate:
    """How a model family marks its reasoning. Strings, tokenized once per engine."""

    name: str
    think_start: str  # the assistant turn opens with it; budgeted prompts get it unless they open thinking already
    think_end: str  # the delimiter the model emits to stop thinking
    answer_prefix: str  # forced after a forced think_end (the cut), so the model answers instead of musing
    wait: str = "Wait"  # appended instead of a premature think_end
    reply_prefix: str = " "  # what a trained reply writes between think_end and the answer

    def reply(self, thinking: str, attempt: str, opened: bool = False) -> str:
        """The assistant turn a trained model writes, in the form budget forcing expects; `opened`
        when the chat prompt already opens thinking. For s1:
        `<|im_start|>think\n{thinking}\n<|im_start|>answer\nAnswer: {attempt}`."""
        start = "" if opened else self.think_start
        return f"{start}{thinking}\n{self.think_end}{self.reply_prefix}{attempt}"


THINK_TEMPLATES = {
    # s1 models (Qwen2.5 ChatML): the assistant turn is `<|im_start|>think\n...<|im_start|>answer\nAnswer: ...`;
    # at the cut the s1 evaluation harness appends the delimiter and "\nFinal Answer:".
    "s1": ThinkTemplate("s1", "<|im_start|>think\n", "<|im_start|>answer", "\nFinal Answer:", reply_prefix="\nAnswer: "),
    # DeepSeek-R1 style: `<think>\n...</think>` then the answer.
    "r1": ThinkTemplate("r1", "<think>\n", "</think>", "\n\nFinal Answer:", reply_prefix="\n\nFinal Answer: "),
    # Qwen3: the same delimiters as added tokens; replies are written as Qwen3's template renders them.
    "qwen3": ThinkTemplate("qwen3", "<think>\n", "</think>", "\n\nFinal Answer:", reply_prefix="\n\n"),
}


def resolve_think_template(spec: "str | ThinkTemplate | None", tokenizer, model_type: str = "") -> ThinkTemplate | None:
    """A template by name or as given, checked against the tokenizer; or derived from it ("auto"):
    qwen3 for Qwen3 models and r1 for others when `</think>` is a token of its own, s1 when
    `<|im_start|>` is. None when nothing fits; such a model serves requests without a budget only."""
    if isinstance(spec, ThinkTemplate) or spec in THINK_TEMPLATES:
        template = spec if isinstance(spec, ThinkTemplate) else THINK_TEMPLATES[spec]
        try:
            require_representable(template, tokenizer)
        except InvalidRequestError as exc:
            raise InvalidConfigError(str(exc)) from None
        return template
    if spec not in (None, "auto"):
        raise InvalidConfigError(f"think_template: unknown template {spec!r}; expected one of {sorted(THINK_TEMPLATES)}")
    vocab = tokenizer.get_vocab()
    r1 = "qwen3" if model_type == "qwen3" else "r1"
    for name, marker in ((r1, "</think>"), ("s1", "<|im_start|>")):
        if marker in vocab:
            template = THINK_TEMPLATES[name]
            try:
                require_representable(template, tokenizer)
            except InvalidRequestError:
                continue
            return template
    return None


def require_representable(template: ThinkTemplate, tokenizer) -> None:
    """Refuse a template that budget forcing cannot enforce with this tokenizer. The engine
    catches the end of thinking by the first token of `think_end`, so that token must be an added
    (special) token that ordinary text never produces; and `wait` must not begin with it."""
    ids = tokenizer.encode(template.think_end, add_special_tokens=False)
    marker = tokenizer.convert_ids_to_tokens(ids[0]) if ids else None
    if marker not in tokenizer.get_added_vocab():
        raise InvalidRequestError(
            "think_template",
            f"the tokenizer has no token of its own for the start of {template.name!r}'s delimiter {template.think_end!r}"
            f" (it becomes {tokenizer.convert_ids_to_tokens(ids)}); pick another template or add the token",
        )
    for name in ("think_start", "wait"):
        if not tokenizer.encode(getattr(template, name), add_special_tokens=False):
            raise InvalidRequestError("think_template", f"{template.name!r}'s {name} {getattr(template, name)!r} tokenizes to nothing")
    if tokenizer.encode(template.wait, add_special_tokens=False)[0] == ids[0]:
        raise InvalidRequestError("think_template", f"{template.name!r}'s wait {template.wait!r} starts with the delimiter's token")


# Arguments of apply_chat_template that the request may not set through chat_template_kwargs.
RESERVED_CHAT_KWARGS = frozenset({"conversation", "messages", "add_generation_prompt", "tokenize", "return_dict",
                                  "continue_final_message", "chat_template", "tools", "documents"})


def chat_prompt_ids(tokenizer, messages: list[dict], template_kwargs: dict | None = None) -> list[int]:
    """Messages as the model's own chat template tokenizes them, opened for the assistant's reply:
    exactly `apply_chat_template(..., add_generation_prompt=True, tokenize=True)`. What the server
    answers and what the trainer computes no loss on."""
    if not tokenizer.chat_template:
        raise InvalidRequestError("messages", "this model has no chat template; send a prompt instead")
    kwargs = dict(template_kwargs or {})
    reserved = sorted(RESERVED_CHAT_KWARGS & set(kwargs))
    if reserved:
        raise InvalidRequestError("chat_template_kwargs", f"may not set {reserved[0]!r}")
    try:
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, **kwargs)
    except Exception as exc:  # jinja raises on malformed messages or template arguments
        raise InvalidRequestError("messages", f"cannot be rendered with the chat template: {exc}") from exc
    return list(encoded["input_ids"])


def think_opener(template: ThinkTemplate, prompt: str) -> str | None:
    """What a budgeted prompt needs appended so that generation starts in the think phase:
    - `think_start` when the prompt has no open think;
    - nothing when it opens thinking already: its chat template's generation prompt does
      (R1-distill, Qwen3 writes `<think>\n`), or it is a partial assistant turn with thinking
      written (that text is the prompt's, not counted against the budget);
    - only the opener's missing trailing whitespace (s1-repository prompts end with `think`).
    None when the prompt ends right after a closed think (Qwen3 with `enable_thinking=False`):
    there is no think phase left, and generation starts in the answer phase."""
    opener = template.think_start.rstrip()
    opened, closed = prompt.rfind(opener), prompt.rfind(template.think_end)
    if opened > closed:
        written, whitespace = prompt[opened + len(opener) :], template.think_start[len(opener) :]
        return whitespace[len(written) :] if whitespace.startswith(written) else ""
    if closed >= 0 and not prompt[closed + len(template.think_end) :].strip():
        return None
    return template.think_start


def assistant_turn_end(tokenizer) -> str:
    """What the chat template writes after an assistant message (`<|im_end|>` for ChatML), without
    trailing whitespace; the tokenizer's EOS when the template writes nothing there."""
    sentinel = "\x00s1serve-reply\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": sentinel}], tokenize=False
    )
    end = text.split(sentinel, 1)[1].rstrip() if sentinel in text else ""
    return end or tokenizer.eos_token


def encode_plain(tokenizer, text: str) -> tuple[int, ...]:
    """`text` as token ids without special-token decoration (no BOS): how forced text is appended."""
    return tuple(tokenizer.encode(text, add_special_tokens=False))


@dataclass(frozen=True)
class ThinkTokens:
    """A template's strings as token ids (tokenized without special-token decoration)."""

    think_start: tuple[int, ...]
    think_end: tuple[int, ...]
    answer_prefix: tuple[int, ...]
    wait: tuple[int, ...]

    @classmethod
    def from_template(cls, template: ThinkTemplate, tokenizer) -> "ThinkTokens":
        return cls(**{name: encode_plain(tokenizer, getattr(template, name))
                      for name in ("think_start", "think_end", "answer_prefix", "wait")})


class Phase(str, Enum):
    THINK = "think"
    DELIMITER = "delimiter"  # think_end tokens: part of neither the thinking nor the answer
    ANSWER = "answer"


class Event(str, Enum):
    WAIT_INSERTED = "WAIT_INSERTED"
    THINK_END_FORCED = "THINK_END_FORCED"
    THINK_CONVERGED = "THINK_CONVERGED"  # adaptive thinking: the last probes agreed, thinking was ended


@dataclass(frozen=True)
class Segment:
    """Tokens to append, all of one phase, either sampled by the model or forced by the engine."""

    phase: Phase
    token_ids: tuple[int, ...]
    forced: bool


@dataclass
class ThinkState:
    """Budget-forcing state of one sequence. It describes the tokens already appended, so it
    survives preemption (recompute re-prefills the same tokens) without any change.

    `think_limit` is where thinking is cut: `max_think`, or less so that the delimiter, the
    answer prefix and the minimum answer fit in `max_tokens` and the context (LLMEngine plans it)."""

    budget: ThinkBudget
    think_end: tuple[int, ...]
    wait: tuple[int, ...]  # this request's wait tokens (its own string or the template's)
    answer_prefix: tuple[int, ...]  # forced after a forced end (the request's or the template's)
    think_limit: int
    phase: Phase = Phase.THINK
    think_tokens: int = 0
    num_waits: int = 0
    think_end_forced: bool = False
    events: list[Event] = field(default_factory=list)  # since the last delta
    probe_answers: list[str] = field(default_factory=list)  # adaptive thinking: each probe's answer
    probed_periods: int = 0  # think_tokens // every when the last probe started
    num_probes: int = 0
    probe_tokens: int = 0  # tokens the probes generated (not part of this sequence)
    converged: bool = False  # adaptive thinking ended it

    def probe_due(self) -> bool:
        """Adaptive thinking probes each time thinking crosses a multiple of `every` tokens (from
        min_think on, never at the cut itself); True also marks the probe as started."""
        a = self.budget.adaptive
        if a is None or self.phase is not Phase.THINK or self.think_tokens // a.every <= self.probed_periods:
            return False
        if self.think_tokens < (self.budget.min_think or 0) or self.think_tokens >= self.think_limit:
            return False
        self.probed_periods = self.think_tokens // a.every
        return True

    def probe_tail(self) -> tuple[int, ...]:
        """What a probe appends to the thinking so far: the forced end, as at the cut."""
        return self.think_end + self.answer_prefix

    def record_probe(self, answer: str) -> bool:
        """Note a probe's answer; True when the last `agree` probes gave the same non-empty one."""
        self.probe_answers.append(answer)
        a = self.budget.adaptive
        last = self.probe_answers[-a.agree :]
        return len(last) == a.agree and all(same(last[0], x, a.method) for x in last[1:])

    def converge(self) -> list[Segment]:
        """End thinking now (the probes agreed): the forced end and answer prefix, as at the cut."""
        self.phase = Phase.ANSWER
        self.think_end_forced = self.converged = True
        self.events.append(Event.THINK_CONVERGED)
        return self._forced_end()

    def _may_insert_wait(self) -> bool:
        b = self.budget
        return bool(b.min_think) and self.think_tokens < b.min_think and not (b.max_waits and self.num_waits >= b.max_waits)

    def accept(self, sampled: int, is_eos: bool) -> list[Segment]:
        """What to append for one sampled token, as segments in order. Every segment of the think
        phase fits under `think_limit`, and what follows it fits in what the limit left."""
        if self.phase is not Phase.THINK:
            return [Segment(Phase.ANSWER, (sampled,), forced=False)]
        ends_thinking = sampled == self.think_end[0] or is_eos
        if ends_thinking and self._may_insert_wait():
            self.num_waits += 1
            self.events.append(Event.WAIT_INSERTED)
            segments = [Segment(Phase.THINK, self.wait[: self.think_limit - self.think_tokens], forced=True)]
        elif ends_thinking:  # the model's own end (or EOS, as in the s1 loop): complete the delimiter
            self.phase = Phase.ANSWER
            if is_eos:  # the model wrote no delimiter: the engine ends thinking as at the cut
                return self._forced_end()
            return [s for s in (Segment(Phase.DELIMITER, (sampled,), forced=False),
                                Segment(Phase.DELIMITER, self.think_end[1:], forced=True)) if s.token_ids]
        else:
            segments = [Segment(Phase.THINK, (sampled,), forced=False)]
        self.think_tokens += len(segments[0].token_ids)
        if self.think_tokens >= self.think_limit:
            self.phase = Phase.ANSWER
            self.think_end_forced = True
            self.events.append(Event.THINK_END_FORCED)
            segments += self._forced_end()
        return segments

    def _forced_end(self) -> list[Segment]:
        """The delimiter and the answer prefix, as the engine appends them when it ends thinking."""
        return [s for s in (Segment(Phase.DELIMITER, self.think_end, forced=True),
                            Segment(Phase.ANSWER, self.answer_prefix, forced=True)) if s.token_ids]

    def take_events(self) -> list[str]:
        events, self.events = [e.value for e in self.events], []
        return events
