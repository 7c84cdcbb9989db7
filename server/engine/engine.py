"""The engine loop: `step()` = schedule -> run -> postprocess, nothing else.

`LLMEngine` is synchronous and single-threaded; `LLM` drives it to completion for offline use and
`AsyncLLM` runs it on a thread for the network fronts. Requests are validated completely in
`make_sequence` before they touch the scheduler, so a bad one never disturbs the batch.
"""

import logging
import random
from pathlib import Path

from transformers import AutoTokenizer

from ..errors import (
    DuplicateRequestError,
    EmptyPromptError,
    InvalidRequestError,
    InvalidSamplingParamError,
    PromptTooLongError,
    RequestNotFoundError,
)
from ..models import ModelConfig
from ..models.paged_attention import attention_backend, prefill_backend
from .block_manager import BlockManager
from .config import EngineConfig
from .detokenizer import Detokenizer
from .model_runner import ModelRunner, context_len
from .outputs import StepOutput
from .params import SamplingParams, ThinkBudget
from .scheduler import ScheduledBatch, Scheduler
from .sequence import FinishReason, Sequence
from .think import Phase, ThinkState, ThinkTokens, chat_prompt, resolve_think_template

logger = logging.getLogger(__name__)

Prompt = str | list[int]


class LLMEngine:
    def __init__(self, model_dir: str | Path, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        self.model_dir = str(model_dir)
        self.model_config = ModelConfig.from_model_dir(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.runner = ModelRunner(self.model_dir, config, self.model_config)
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.detokenizer = Detokenizer(self.tokenizer)
        context = context_len(config, self.model_config)
        pool = self.runner.num_blocks * config.block_size
        self.max_model_len = min(context, pool)
        self._length_limit = "max_model_len" if context <= pool else f"the KV cache pool ({pool} tokens)"
        self.eos_token_ids = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.think_template = resolve_think_template(config.think_template, self.tokenizer)
        self.think_ids = ThinkTokens.from_template(self.think_template, self.tokenizer) if self.think_template else None
        self._rng = random.Random(config.seed)
        self.sequences: dict[str, Sequence] = {}  # unfinished requests by id, for abort
        logger.info(
            "engine ready: %s on %s/%s, attention %s (prefill %s), linear %s, %d KV blocks x %d tokens, max_model_len %d, think template %s",
            self.model_config.model_type, self.runner.device, self.runner.dtype,
            attention_backend(self.runner.device.type), prefill_backend(self.runner.device.type),
            self.runner.linear_backend, self.runner.num_blocks, config.block_size, self.max_model_len,
            self.think_template.name if self.think_template else None,
        )

    # ---- requests -------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict]) -> str:
        """A chat request as prompt text: the model's chat template, opened for the assistant, plus
        the think opener when the model has a think template."""
        return chat_prompt(self.tokenizer, messages) + (self.think_template.think_start if self.think_template else "")

    def make_sequence(
        self, request_id: str, prompt: Prompt, sampling: SamplingParams, budget: ThinkBudget | None = None
    ) -> Sequence:
        """Validate and tokenize a request; raises an InvalidRequestError subclass naming the field."""
        if not isinstance(sampling, SamplingParams):
            raise InvalidRequestError("sampling", f"expected SamplingParams, got {type(sampling).__name__}")
        if budget is not None and not isinstance(budget, ThinkBudget):
            raise InvalidRequestError("budget", f"expected ThinkBudget or None, got {type(budget).__name__}")
        if budget is not None and self.think_ids is None:
            raise InvalidRequestError("budget", "this model has no think template; start the engine with think_template=")
        vocab = self.model_config.vocab_size
        if isinstance(prompt, str):
            if budget is not None:
                prompt = self._open_thinking(prompt)
            token_ids = self.tokenizer(prompt).input_ids if prompt else []
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            token_ids = list(prompt)
            bad = [t for t in token_ids if not 0 <= t < vocab]
            if bad:
                raise InvalidRequestError("prompt", f"token id {bad[0]} is outside the model's vocabulary [0, {vocab})")
        else:
            raise InvalidRequestError("prompt", "must be a string or a list of token ids")
        if not token_ids:
            raise EmptyPromptError()
        if budget is not None and not isinstance(prompt, str):
            start = list(self.think_ids.think_start)
            if token_ids[-len(start) :] != start:
                token_ids += start
        think = self._think_state(budget, len(token_ids)) if budget is not None else None
        if len(token_ids) >= self.max_model_len:
            raise PromptTooLongError(len(token_ids), self.max_model_len - 1, self._length_limit)
        for name in ("stop_token_ids", "logit_bias"):
            ids = [t for t in getattr(sampling, name) if t >= vocab]
            if ids:
                raise InvalidSamplingParamError(name, f"token id {ids[0]} is outside the model's vocabulary [0, {vocab})")
        seed = sampling.seed if sampling.seed is not None else self._rng.getrandbits(63)
        seq = Sequence(request_id, token_ids, sampling, seed, think=think)
        self.detokenizer.start(seq)
        return seq

    def _open_thinking(self, prompt: str) -> str:
        """Budgeted generation starts in the think phase: append the think opener if missing
        (or only its trailing whitespace, for prompts written like the s1 repository's)."""
        start = self.think_template.think_start
        if prompt.endswith(start):
            return prompt
        if prompt.endswith(start.rstrip()):
            return prompt + start[len(start.rstrip()) :]
        return prompt + start

    def _think_state(self, budget: ThinkBudget, num_prompt_tokens: int) -> ThinkState:
        wait = self.think_ids.wait
        if budget.wait is not None:
            wait = tuple(self.tokenizer.encode(budget.wait, add_special_tokens=False))
            if not wait:
                raise InvalidRequestError("wait", f"{budget.wait!r} tokenizes to nothing")
            if wait[0] == self.think_ids.think_end[0]:
                raise InvalidRequestError("wait", "must not start with the think_end delimiter")
        room = self.max_model_len - num_prompt_tokens - len(self.think_ids.think_end) - len(self.think_ids.answer_prefix)
        if budget.max_think and budget.max_think > room:
            raise InvalidRequestError(
                "max_think", f"{budget.max_think} does not fit in the context: at most {max(room, 0)} for this prompt"
            )
        return ThinkState(budget, self.think_ids, wait)

    def add_sequence(self, seq: Sequence) -> None:
        if seq.request_id in self.sequences:
            raise DuplicateRequestError(seq.request_id)
        self.sequences[seq.request_id] = seq
        self.scheduler.add(seq)

    def add_request(
        self, request_id: str, prompt: Prompt, sampling: SamplingParams, budget: ThinkBudget | None = None
    ) -> None:
        self.add_sequence(self.make_sequence(request_id, prompt, sampling, budget))

    def abort(self, request_id: str) -> StepOutput:
        seq = self.sequences.pop(request_id, None)
        if seq is None:
            raise RequestNotFoundError(request_id)
        self.scheduler.finish(seq)
        seq.finish_reason = FinishReason.ABORT
        return self._delta(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the loop -------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        sampled = self.runner.run(batch)
        return self._postprocess(batch, sampled)

    def _postprocess(self, batch: ScheduledBatch, sampled: list[int | None]) -> list[StepOutput]:
        outputs = []
        for seq, n, token in zip(batch.seqs, batch.num_new_tokens, sampled):
            seq.num_computed_tokens += n
            self.block_manager.cache_full_blocks(seq)
            if token is None:
                continue  # a prefill chunk that did not reach the end of the prompt
            added = self._append(seq, token)
            reason = self._finish_reason(seq, seq.token_ids[-1], added)
            if reason is not None:
                if not seq.stopped_by_string:  # flush a pending partial character, as a full decode would
                    self.detokenizer.step(seq, final=True)
                seq.finish_reason = reason
                self.scheduler.finish(seq)
                del self.sequences[seq.request_id]
            outputs.append(self._delta(seq))
        return outputs

    def _append(self, seq: Sequence, token: int) -> str:
        """Append the sampled token, or what budget forcing puts in its place; returns new text.

        Forced tokens are cut at max_tokens / the context like sampled ones (`think_end_forced`
        still records the decision); the next step computes their K/V as one chunk, exactly
        like a prompt chunk.
        """
        if seq.think is None:
            seq.token_ids.append(token)
            return self.detokenizer.step(seq)
        is_eos = token in self.eos_token_ids and not seq.sampling.ignore_eos
        room = min(seq.sampling.max_tokens - seq.num_output_tokens, self.max_model_len - seq.num_tokens)
        added = ""
        for phase, tokens in seq.think.accept(token, is_eos, room):
            if phase is Phase.DELIMITER:  # pin where the thinking text ends and the answer begins
                added += self.detokenizer.step(seq, final=True)
                seq.think_end_char = len(seq.text)
            seq.token_ids += tokens
            added += self.detokenizer.step(seq, final=phase is Phase.DELIMITER)
            if phase is Phase.DELIMITER:
                seq.answer_start_char, seq.answer_start_token = len(seq.text), seq.num_output_tokens
        return added

    def _finish_reason(self, seq: Sequence, token: int, added: str) -> FinishReason | None:
        sp = seq.sampling
        if (token in self.eos_token_ids and not sp.ignore_eos) or token in sp.stop_token_ids:
            return FinishReason.STOP
        if added and sp.stop:
            window = max(0, len(seq.text) - len(added) - max(map(len, sp.stop)) + 1)
            hits = [i for i in (seq.text.find(s, window) for s in sp.stop) if i >= 0]
            if hits:
                seq.text = seq.text[: min(hits)]
                seq.stopped_by_string = True
                return FinishReason.STOP
        if seq.num_output_tokens >= sp.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _delta(self, seq: Sequence) -> StepOutput:
        """New tokens and text since the last delta; text that may begin a stop string waits."""
        visible = len(seq.text)
        if not seq.is_finished:
            visible -= _partial_stop_len(seq.text, seq.sampling.stop)
        emitted = seq.num_emitted_chars
        think_end = visible if seq.think_end_char is None else min(seq.think_end_char, visible)
        answer_start = visible if seq.answer_start_char is None else max(seq.answer_start_char, emitted)
        seq.num_emitted_chars = max(emitted, visible)
        new_tokens = seq.output_token_ids[seq.num_emitted_tokens :]
        seq.num_emitted_tokens = seq.num_output_tokens
        think = seq.think
        return StepOutput(
            request_id=seq.request_id,
            new_token_ids=new_tokens,
            new_text=seq.text[emitted:visible],
            finished=seq.is_finished,
            finish_reason=seq.finish_reason.value if seq.finish_reason else None,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            think_text=seq.text[emitted:think_end],
            answer_text=seq.text[answer_start:visible],
            events=think.take_events() if think else [],
            phase="think" if seq.answer_start_char is None else "answer",
            think_tokens=seq.think_tokens,
            answer_tokens=seq.answer_tokens,
            num_waits=think.num_waits if think else 0,
            think_end_forced=think.think_end_forced if think else False,
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
