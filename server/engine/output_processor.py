"""The output side of the engine: appended token ids in, phase-split text and stream deltas out.

Per request it keeps each phase's text (thinking, the delimiter, the answer) and whether each
token was sampled or forced, and it matches stop strings. The rule for stops (DESIGN.md): stop
strings and stop token ids belong to the answer phase and to what the model sampled there; they
never match thinking, nor the Wait / delimiter / answer prefix the engine forced in, and a match
cuts the answer only. Stop token ids and EOS are the core's to check (LLMEngine), since they end
the sequence without any text; stop strings are checked here and the engine finishes the request
when `process` reports one.
"""

from dataclasses import dataclass, field

from .detokenizer import IncrementalDetokenizer, decode_known
from .outputs import StepOutput, TokenLogprobs
from .sequence import FinishReason, Sequence
from .think import Phase, Segment


@dataclass
class RequestState:
    request_id: str
    stop: tuple[str, ...]
    detokenizer: IncrementalDetokenizer
    think_text: str = ""
    delimiter_text: str = ""  # the delimiter as the model's vocabulary writes it (special tokens kept)
    answer_text: str = ""
    stop_floor: int = 0  # chars of answer_text that no stop string may match: the forced answer prefix
    num_answer_tokens: int = 0  # tokens after the delimiter, the forced answer prefix included
    answer_started: bool = False
    new_token_ids: list[int] = field(default_factory=list)  # since the last delta
    new_forced: list[bool] = field(default_factory=list)
    new_logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    wants_logprobs: bool = False
    emitted_think: int = 0  # chars already reported
    emitted_delimiter: int = 0
    emitted_answer: int = 0


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)  # ids past it (extra embedding rows) decode to nothing
        self.requests: dict[Sequence, RequestState] = {}  # per sample (a Sequence hashes by identity)

    def add(self, seq: Sequence) -> None:
        detokenizer = IncrementalDetokenizer(self.tokenizer, self.vocab_size, seq.prompt_token_ids)
        self.requests[seq] = RequestState(seq.request_id, seq.sampling.stop, detokenizer,
                                          answer_started=seq.think is None or seq.think.phase is Phase.ANSWER,
                                          wants_logprobs=seq.sampling.logprobs is not None)

    def process(self, seq: Sequence, segments: list[Segment], finish: FinishReason | None,
                logprobs: TokenLogprobs | None = None) -> StepOutput:
        """Text for the segments the engine just appended; the step's delta. A stop string in the
        answer makes the delta finished with reason "stop" (the engine then finishes the sequence).
        `logprobs` belong to the sampled token, which heads the first unforced segment if it was kept."""
        state = self.requests[seq]
        for segment in segments:
            self._append(state, segment)
            if state.wants_logprobs:
                kept = not segment.forced and logprobs is not None
                state.new_logprobs += [logprobs if kept and i == 0 else None for i in range(len(segment.token_ids))]
                logprobs = None if kept else logprobs
        if state.stop and self._cut_at_stop(state, segments):
            finish = FinishReason.STOP
        elif finish is not None and finish is not FinishReason.ABORT:
            self._append_text(state, Phase.ANSWER if state.answer_started else Phase.THINK, state.detokenizer.add((), final=True))
        return self._delta(seq, state, finish)

    def _append(self, state: RequestState, segment: Segment) -> None:
        state.new_token_ids += segment.token_ids
        state.new_forced += [segment.forced] * len(segment.token_ids)
        if segment.phase is Phase.DELIMITER:
            # Flush what thinking left pending, then keep the delimiter's text out of both phases.
            self._append_text(state, Phase.THINK, state.detokenizer.add((), final=True))
            state.detokenizer.add(segment.token_ids, final=True)
            state.delimiter_text += decode_known(self.tokenizer, segment.token_ids, False, self.vocab_size)
            state.answer_started = True
            return
        if segment.phase is Phase.ANSWER:
            state.num_answer_tokens += len(segment.token_ids)
        forced_answer = segment.forced and segment.phase is Phase.ANSWER
        # A forced answer prefix is flushed whole, so that stops match exactly what follows it.
        self._append_text(state, segment.phase, state.detokenizer.add(segment.token_ids, final=forced_answer))
        if forced_answer:
            state.stop_floor = len(state.answer_text)

    @staticmethod
    def _append_text(state: RequestState, phase: Phase, text: str) -> None:
        if phase is Phase.ANSWER:
            state.answer_text += text
        else:
            state.think_text += text

    @staticmethod
    def _cut_at_stop(state: RequestState, segments: list[Segment]) -> bool:
        """Cut the answer at the first stop string in its sampled text; True when one matched."""
        if not any(s.phase is Phase.ANSWER and not s.forced for s in segments):
            return False
        text = state.answer_text
        start = max(state.stop_floor, state.emitted_answer - max(map(len, state.stop)) + 1)
        hits = [i for i in (text.find(s, start) for s in state.stop) if i >= 0]
        if not hits:
            return False
        state.answer_text = text[: min(hits)]
        return True

    def _delta(self, seq: Sequence, state: RequestState, finish: FinishReason | None) -> StepOutput:
        """New tokens and text since the last delta; answer text that may begin a stop string waits."""
        visible = len(state.answer_text)
        if finish is None:
            visible -= _partial_stop_len(state.answer_text[state.stop_floor :], state.stop)
        think = state.think_text[state.emitted_think :]
        delimiter = state.delimiter_text[state.emitted_delimiter :]
        answer = state.answer_text[state.emitted_answer : visible] if visible > state.emitted_answer else ""
        state.emitted_think, state.emitted_delimiter = len(state.think_text), len(state.delimiter_text)
        state.emitted_answer = max(state.emitted_answer, visible)
        new_token_ids, forced, logprobs = state.new_token_ids, state.new_forced, state.new_logprobs
        state.new_token_ids, state.new_forced, state.new_logprobs = [], [], []
        if finish is not None:
            del self.requests[seq]
        t = seq.think
        return StepOutput(
            request_id=seq.request_id,
            new_token_ids=new_token_ids,
            forced=forced,
            new_text=think + delimiter + answer,
            finished=finish is not None,
            finish_reason=finish.value if finish else None,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            think_text=think,
            answer_text=answer,
            events=t.take_events() if t else [],
            phase="answer" if state.answer_started else "think",
            think_tokens=t.think_tokens if t else 0,
            answer_tokens=state.num_answer_tokens,
            num_waits=t.num_waits if t else 0,
            think_end_forced=t.think_end_forced if t else False,
            logprobs=logprobs,
            index=seq.index,
            num_probes=t.num_probes if t else 0,
            probe_tokens=t.probe_tokens if t else 0,
            converged=t.converged if t else False,
        )


def _partial_stop_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best
