"""The engine loop: `step()` = schedule -> run -> postprocess, nothing else.

Three sides: the input side (`make_sequence`: validate, tokenize, open thinking, plan the budget),
the core (schedule, run, force budgets, EOS / stop ids / length) and the output side
(`OutputProcessor`: text by phase, stop strings, deltas).

`LLMEngine` is synchronous and single-threaded; `LLM` drives it to completion for offline use and
`AsyncLLM` runs it on a thread for the network fronts. Requests are validated completely in
`make_sequence` before they touch the scheduler, so a bad one never disturbs the batch.
"""

import copy
import logging
import random
from pathlib import Path

from transformers import AutoTokenizer

from ..answers import extract as extract_answer
from ..errors import (
    DuplicateRequestError,
    InvalidConfigError,
    EmptyPromptError,
    InvalidRequestError,
    InvalidSamplingParamError,
    PromptTooLongError,
    RequestNotFoundError,
    UnsupportedModelError,
)
from ..models import ModelConfig
from ..models.paged_attention import attention_backend, prefill_backend
from .block_manager import BlockManager
from .config import EngineConfig
from .detokenizer import decode_known
from .model_runner import ModelRunner, context_len
from .output_processor import OutputProcessor
from .outputs import StepOutput
from .params import SamplingParams, ThinkBudget
from .sampler import Sample, sample_seed
from .scheduler import ScheduledBatch, Scheduler
from .sequence import FinishReason, Sequence, SequenceStatus
from .think import (
    Phase,
    Segment,
    ThinkState,
    ThinkTokens,
    chat_prompt_ids,
    encode_plain,
    resolve_think_template,
    think_opener,
)

logger = logging.getLogger(__name__)

Prompt = str | list[int]


class LLMEngine:
    def __init__(self, model_dir: str | Path, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        self.model_dir = str(model_dir)
        self.model_config = ModelConfig.from_model_dir(model_dir)
        positions = self.model_config.max_position_embeddings
        if config.max_model_len and config.max_model_len > positions:
            raise InvalidConfigError(f"max_model_len: {config.max_model_len} exceeds the model's {positions} positions (max_position_embeddings)")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        except (OSError, ValueError) as exc:  # no or broken tokenizer files: one line, not a traceback
            raise UnsupportedModelError(f"{self.model_dir}: cannot load its tokenizer ({str(exc).splitlines()[0]})") from None
        self.runner = ModelRunner(self.model_dir, config, self.model_config)
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.long_prefill_token_threshold)
        self.output = OutputProcessor(self.tokenizer)
        context = context_len(config, self.model_config)
        pool = self.runner.num_blocks * config.block_size
        self.max_model_len = min(context, pool)
        self._length_limit = "max_model_len" if context <= pool else f"the KV cache pool ({pool} tokens)"
        self.eos_token_ids = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.think_template = resolve_think_template(config.think_template, self.tokenizer, self.model_config.model_type)
        self.think_ids = ThinkTokens.from_template(self.think_template, self.tokenizer) if self.think_template else None
        self._rng = random.Random(config.seed)
        # Unfinished requests by id: their samples (one unless n > 1), finished ones included until all are.
        self.sequences: dict[str, list[Sequence]] = {}
        logger.info(
            "engine ready: %s on %s/%s, attention %s (prefill %s), linear %s, %d KV blocks x %d tokens, max_model_len %d, think template %s",
            self.model_config.model_type, self.runner.device, self.runner.dtype,
            attention_backend(self.runner.device.type), prefill_backend(self.runner.device.type),
            self.runner.linear_backend, self.runner.num_blocks, config.block_size, self.max_model_len,
            self.think_template.name if self.think_template else None,
        )

    # ---- requests -------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict], template_kwargs: dict | None = None) -> list[int]:
        """A chat request as the model's own chat template tokenizes it, opened for the assistant.
        The think opener is not added here: `make_sequence` adds it to budgeted requests only."""
        return chat_prompt_ids(self.tokenizer, messages, template_kwargs)

    def token_text(self, token_id: int) -> str:
        """One token as text (special tokens written out; ids the tokenizer lacks are ""), for logprobs."""
        return decode_known(self.tokenizer, [token_id], False, self.output.vocab_size)

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
        token_ids, thinking = self._tokenize(prompt, budget is not None)
        if len(token_ids) >= self.max_model_len:
            raise PromptTooLongError(len(token_ids), self.max_model_len - 1, self._length_limit)
        vocab = self.model_config.vocab_size
        for name in ("stop_token_ids", "logit_bias"):
            ids = [t for t in getattr(sampling, name) if t >= vocab]
            if ids:
                raise InvalidSamplingParamError(name, f"token id {ids[0]} is outside the model's vocabulary [0, {vocab})")
        if budget is None:
            think, max_tokens = None, sampling.max_tokens or self.config.default_max_tokens
        else:
            think, max_tokens = self._plan_budget(budget, sampling, len(token_ids), thinking)
        seed = sampling.seed if sampling.seed is not None else self._rng.getrandbits(63)
        seq = Sequence(request_id, token_ids, sampling, seed, think=think, max_tokens=max_tokens)
        for index in range(1, sampling.n):  # forked off `seq` once its prompt is computed; its own budget state
            seq.pending_forks.append(Sequence(request_id, token_ids, sampling, sample_seed(seed, index),
                                              think=copy.deepcopy(think), max_tokens=max_tokens, index=index,
                                              status=SequenceStatus.FORKING))
        return seq

    def _tokenize(self, prompt: Prompt, budgeted: bool) -> tuple[list[int], bool]:
        """The prompt's token ids, with the think opener appended when a budgeted prompt does not
        open thinking itself (think.think_opener), and whether generation starts in the think phase."""
        if isinstance(prompt, str):
            if not prompt:
                raise EmptyPromptError()
            opener = think_opener(self.think_template, prompt) if budgeted else ""
            return self.tokenizer(prompt + (opener or "")).input_ids, opener is not None
        if not (isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt)):
            raise InvalidRequestError("prompt", "must be a string or a list of token ids")
        if not prompt:
            raise EmptyPromptError()
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError("prompt", f"token id {bad[0]} is outside the model's vocabulary [0, {vocab})")
        if not budgeted:
            return list(prompt), False
        opener = think_opener(self.think_template, decode_known(self.tokenizer, prompt, skip_special_tokens=False))
        return list(prompt) + list(encode_plain(self.tokenizer, opener or "")), opener is not None

    def _plan_budget(
        self, budget: ThinkBudget, sampling: SamplingParams, num_prompt_tokens: int, thinking: bool
    ) -> tuple[ThinkState, int]:
        """Where thinking is cut and how many tokens the request may generate, so that a budgeted
        request always reaches an answer phase with `min_answer_tokens` of room, or is refused
        here naming the field. `max_tokens` counts thinking, forced and answer tokens (as OpenAI and
        vLLM do); unset, it is the think limit + the forced end + `default_max_tokens` for the answer."""
        cfg, t = self.config, self.think_ids
        wait = t.wait
        if budget.wait is not None:
            wait = encode_plain(self.tokenizer, budget.wait)
            if not wait:
                raise InvalidRequestError("wait", f"{budget.wait!r} tokenizes to nothing")
            if wait[0] == t.think_end[0]:
                raise InvalidRequestError("wait", "must not start with the think_end delimiter")
            if self.eos_token_ids & set(wait):
                raise InvalidRequestError("wait", "must not contain the end-of-sequence token (it would end the reply)")
        answer_prefix = t.answer_prefix if budget.answer_prefix is None else encode_plain(self.tokenizer, budget.answer_prefix)
        if not thinking:
            if budget.min_think:
                raise InvalidRequestError("min_think", "the prompt already closes thinking (e.g. enable_thinking=false): there is no thinking to extend")
            state = ThinkState(budget, t.think_end, wait, answer_prefix, think_limit=0, phase=Phase.ANSWER)
            return state, sampling.max_tokens or cfg.default_max_tokens
        forced = len(t.think_end) + len(answer_prefix)
        reserve = self._answer_reserve(answer_prefix)
        need = f"the forced end ({forced} tokens) and at least {cfg.min_answer_tokens} answer tokens"
        room = self.max_model_len - num_prompt_tokens
        if budget.max_think and budget.max_think > room - reserve:
            raise InvalidRequestError(
                "max_think", f"{budget.max_think} does not fit in the context with {need}: at most {max(room - reserve, 0)} for this prompt"
            )
        if sampling.max_tokens is None:
            limit = min(budget.max_think or cfg.default_max_tokens, room - reserve)
            max_tokens = limit + forced + cfg.default_max_tokens
        else:
            max_tokens = sampling.max_tokens
            if budget.max_think and budget.max_think > max_tokens - reserve:
                raise InvalidRequestError(
                    "max_think", f"{budget.max_think} leaves no room to answer within max_tokens {max_tokens}, which counts"
                    f" thinking too: max_tokens must be at least max_think + {reserve} ({need})"
                )
            limit = min(budget.max_think or max_tokens, max_tokens - reserve, room - reserve)
        if limit < 1:
            short = "max_tokens" if sampling.max_tokens is not None and sampling.max_tokens - reserve < 1 else "prompt"
            raise InvalidRequestError(short, f"leaves no room to think and answer: a budgeted request needs {reserve + 1} tokens ({need} and 1 thinking token)")
        if budget.min_think and budget.min_think > limit:
            raise InvalidRequestError(
                "min_think", f"{budget.min_think} does not fit: thinking is cut at {limit} tokens here so that {need} fit;"
                " lower min_think or raise max_tokens"
            )
        return ThinkState(budget, t.think_end, wait, answer_prefix, think_limit=limit), max_tokens

    def think_room(self, max_tokens: int) -> int:
        """The most thinking a budgeted request with this `max_tokens` may have (the template's
        answer prefix): what the forced end and `min_answer_tokens` leave."""
        return max_tokens - self._answer_reserve(self.think_ids.answer_prefix)

    def _answer_reserve(self, answer_prefix: tuple[int, ...]) -> int:
        """Tokens a budgeted request keeps free after thinking: the forced end and the minimum answer."""
        return len(self.think_ids.think_end) + len(answer_prefix) + self.config.min_answer_tokens

    def add_sequence(self, seq: Sequence) -> None:
        if seq.request_id in self.sequences:
            raise DuplicateRequestError(seq.request_id)
        self.sequences[seq.request_id] = [seq, *seq.pending_forks]
        for sample in self.sequences[seq.request_id]:
            self.output.add(sample)
        self.scheduler.add(seq)

    def add_request(
        self, request_id: str, prompt: Prompt, sampling: SamplingParams, budget: ThinkBudget | None = None
    ) -> None:
        self.add_sequence(self.make_sequence(request_id, prompt, sampling, budget))

    def abort(self, request_id: str, index: int | None = None) -> list[StepOutput]:
        """End the request's unfinished samples (or only sample `index`); their last deltas
        (finish_reason abort). The others of an n > 1 request go on unchanged."""
        samples = self.sequences.get(request_id)
        if samples is None:
            raise RequestNotFoundError(request_id)
        deltas = []
        for seq in samples:
            if seq.finish_reason is None and index in (None, seq.index):
                self._finish(seq, FinishReason.ABORT)
                deltas.append(self.output.process(seq, [], FinishReason.ABORT))
        for delta in deltas:
            delta.request_finished = request_id not in self.sequences
        return deltas

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the loop -------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        sampled, fork_samples = self.runner.run(batch)
        return self._postprocess(batch, sampled, fork_samples)

    def _postprocess(self, batch: ScheduledBatch, sampled: list[Sample | None],
                     fork_samples: list[list[Sample]]) -> list[StepOutput]:
        outputs = []
        for seq, n, sample, forks in zip(batch.seqs, batch.num_new_tokens, sampled, fork_samples):
            seq.num_computed_tokens += n
            self.block_manager.cache_full_blocks(seq)
            if sample is None:
                continue  # a prefill chunk that did not reach the end of the prompt
            if seq.probe_of is not None:
                outputs += self._advance_probe(seq, sample[0])
                continue
            # n > 1: the other samples fork off the computed prompt (before this one may finish and free it).
            forked = [(child, s) for child, s in zip(seq.pending_forks, forks) if self._fork(seq, child)]
            seq.pending_forks = []
            outputs.append(self._advance(seq, sample))
            outputs += [self._advance(child, s) for child, s in forked]
        return outputs

    def _advance(self, seq: Sequence, sample: Sample) -> StepOutput:
        """Append what the sampled token becomes; the step's delta for this sample."""
        token, logprobs = sample
        segments = self._segments(seq, token)
        for segment in segments:
            seq.token_ids += segment.token_ids
        delta = self.output.process(seq, segments, self._finish_reason(seq, segments[-1]), logprobs)
        if delta.finished:  # EOS, a stop id or the length here; a stop string on the output side
            self._finish(seq, FinishReason(delta.finish_reason))
        elif seq.think is not None and seq.think.probe_due():
            self._start_probe(seq)
        delta.request_finished = seq.request_id not in self.sequences
        return delta

    def _fork(self, parent: Sequence, child: Sequence) -> bool:
        """Start sample `child` on `parent`'s computed prompt blocks (copy-on-write); True when it
        takes the first token sampled for it this step. Without a free block for the copy it is
        queued instead and computes its prompt itself (the prefix cache still shares full blocks)."""
        if self._share_blocks(parent, child):
            return True
        child.status = SequenceStatus.WAITING
        self.scheduler.add(child)
        return False

    def _share_blocks(self, parent: Sequence, child: Sequence) -> bool:
        """Fork `child` copy-on-write off `parent`'s computed tokens and run it from the next step;
        False, changing nothing, when no block is free for the copy of the partly filled one."""
        copies = self.block_manager.fork(parent, child)
        if copies is None:
            return False
        self.runner.copy_blocks(copies)
        self.scheduler.add_running(child)
        return True

    # ---- adaptive thinking ----------------------------------------------------------------------
    def _start_probe(self, seq: Sequence) -> None:
        """Fork `seq` into a hidden probe whose prompt is its tokens + the forced end, decoded greedily
        (with the request's logit_bias); `seq` waits (the scheduler skips it) until the probe's
        answer is in. No free block: no probe this time."""
        adaptive = seq.think.budget.adaptive
        probe = Sequence(f"{seq.request_id}#probe", seq.token_ids + list(seq.think.probe_tail()),
                         SamplingParams(temperature=0, max_tokens=adaptive.probe_tokens, logit_bias=seq.sampling.logit_bias),
                         seed=0,
                         max_tokens=adaptive.probe_tokens, index=seq.index, probe_of=seq)
        if self._share_blocks(seq, probe):
            seq.probe = probe
            seq.think.num_probes += 1

    def _advance_probe(self, probe: Sequence, token: int) -> list[StepOutput]:
        """A probe's greedy answer token; when it is done, its answer decides whether thinking ends."""
        parent = probe.probe_of
        probe.token_ids.append(token)
        parent.think.probe_tokens += 1
        last = Segment(Phase.ANSWER, (token,), forced=False)
        if self._finish_reason(probe, last) is None:
            return []
        self.scheduler.finish(probe)
        parent.probe = None
        think = parent.think
        text = decode_known(self.tokenizer, list(think.answer_prefix) + probe.output_token_ids, True, self.output.vocab_size)
        if not think.record_probe(extract_answer(text, think.budget.adaptive.method)):
            return []
        segments = think.converge()  # the last probes agree: end thinking where they forked
        for segment in segments:
            parent.token_ids += segment.token_ids
        delta = self.output.process(parent, segments, None)
        delta.request_finished = False
        return [delta]

    def _segments(self, seq: Sequence, token: int) -> list[Segment]:
        """What to append for the sampled token: the token itself, or what budget forcing puts in
        its place. The next step computes forced tokens' K/V as one chunk, like a prompt chunk."""
        if seq.think is None:
            return [Segment(Phase.ANSWER, (token,), forced=False)]
        return seq.think.accept(token, is_eos=token in self.eos_token_ids and not seq.sampling.ignore_eos)

    def _finish_reason(self, seq: Sequence, last: Segment) -> FinishReason | None:
        """EOS or a stop token id sampled in the answer phase (never a forced token, never thinking),
        or the length. Stop strings are matched on the output side."""
        sp = seq.sampling
        if last.phase is Phase.ANSWER and not last.forced:
            token = last.token_ids[-1]
            if (token in self.eos_token_ids and not sp.ignore_eos) or token in sp.stop_token_ids:
                return FinishReason.STOP
        if seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.finish_reason = reason
        self.scheduler.finish(seq)
        if seq.probe is not None:  # its probe has nothing left to decide
            self.scheduler.finish(seq.probe)
            seq.probe = None
        for child in seq.pending_forks:  # sample 0 ended before its prompt was computed: the others
            child.status = SequenceStatus.WAITING  # compute it themselves
            self.scheduler.add(child)
        seq.pending_forks = []
        if all(s.finish_reason is not None for s in self.sequences[seq.request_id]):
            del self.sequences[seq.request_id]
