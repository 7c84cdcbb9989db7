"""The engine loop: `step()` = schedule -> run -> postprocess, nothing else.

`LLMEngine` is synchronous and single-threaded; `LLM` drives it to completion for offline use and
`AsyncLLM` runs it on a thread for the network fronts. Requests are validated completely in
`make_sequence` before they touch the scheduler, so a bad one never disturbs the batch.
"""

import logging
import random
from pathlib import Path

from transformers import AutoTokenizer

from ..models import ModelConfig
from ..models.paged_attention import attention_backend
from .block_manager import BlockManager
from .config import EngineConfig
from .detokenizer import Detokenizer
from ..errors import (
    DuplicateRequestError,
    EmptyPromptError,
    InvalidRequestError,
    InvalidSamplingParamError,
    PromptTooLongError,
    RequestNotFoundError,
)
from .model_runner import ModelRunner, context_len
from .outputs import StepOutput
from .params import SamplingParams
from .scheduler import ScheduledBatch, Scheduler
from .sequence import FinishReason, Sequence

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
        self._rng = random.Random(config.seed)
        self.sequences: dict[str, Sequence] = {}  # unfinished requests by id, for abort
        logger.info(
            "engine ready: %s on %s/%s, attention %s, %d KV blocks x %d tokens, max_model_len %d",
            self.model_config.model_type, self.runner.device, self.runner.dtype,
            attention_backend(self.runner.device.type), self.runner.num_blocks, config.block_size, self.max_model_len,
        )

    # ---- requests -------------------------------------------------------------------------------
    def make_sequence(self, request_id: str, prompt: Prompt, sampling: SamplingParams) -> Sequence:
        """Validate and tokenize a request; raises an InvalidRequestError subclass naming the field."""
        if not isinstance(sampling, SamplingParams):
            raise InvalidRequestError("sampling", f"expected SamplingParams, got {type(sampling).__name__}")
        vocab = self.model_config.vocab_size
        if isinstance(prompt, str):
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
        if len(token_ids) >= self.max_model_len:
            raise PromptTooLongError(len(token_ids), self.max_model_len - 1, self._length_limit)
        for name in ("stop_token_ids", "logit_bias"):
            ids = [t for t in getattr(sampling, name) if t >= vocab]
            if ids:
                raise InvalidSamplingParamError(name, f"token id {ids[0]} is outside the model's vocabulary [0, {vocab})")
        seed = sampling.seed if sampling.seed is not None else self._rng.getrandbits(63)
        seq = Sequence(request_id, token_ids, sampling, seed)
        self.detokenizer.start(seq)
        return seq

    def add_sequence(self, seq: Sequence) -> None:
        if seq.request_id in self.sequences:
            raise DuplicateRequestError(seq.request_id)
        self.sequences[seq.request_id] = seq
        self.scheduler.add(seq)

    def add_request(self, request_id: str, prompt: Prompt, sampling: SamplingParams) -> None:
        self.add_sequence(self.make_sequence(request_id, prompt, sampling))

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
            seq.token_ids.append(token)
            added = self.detokenizer.step(seq)
            reason = self._finish_reason(seq, token, added)
            if reason is not None:
                if not seq.stopped_by_string:  # flush a pending partial character, as a full decode would
                    self.detokenizer.step(seq, final=True)
                seq.finish_reason = reason
                self.scheduler.finish(seq)
                del self.sequences[seq.request_id]
            outputs.append(self._delta(seq))
        return outputs

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
        new_text = seq.text[seq.num_emitted_chars : visible] if visible > seq.num_emitted_chars else ""
        seq.num_emitted_chars = max(seq.num_emitted_chars, visible)
        new_tokens = seq.output_token_ids[seq.num_emitted_tokens :]
        seq.num_emitted_tokens = seq.num_output_tokens
        return StepOutput(
            request_id=seq.request_id,
            new_token_ids=new_tokens,
            new_text=new_text,
            finished=seq.is_finished,
            finish_reason=seq.finish_reason.value if seq.finish_reason else None,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
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
