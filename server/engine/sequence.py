"""A request's state inside the engine core: tokens so far and how many of them have KV computed.
Text, phases and stop strings are the output side's (output_processor.py).

The scheduler's whole job is to close the gap `num_tokens - num_computed_tokens` within a token
budget; a prefill, a prefill chunk, a recompute after preemption and a decode step are all that.
Plain Python, no torch: the CPU-side bookkeeping is testable in milliseconds.
"""

from dataclasses import dataclass, field
from enum import Enum, auto

from .params import SamplingParams
from .think import ThinkState


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()
    FORKING = auto()  # a sample of an n > 1 request, waiting to be forked off its prompt's prefill


class FinishReason(str, Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"  # cancelled by the client


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    seed: int  # the request's seed, or one the engine drew for it
    token_ids: list[int] = field(init=False)  # prompt + output
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at first admission
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # chain hash of each full block so far
    num_registered_blocks: int = 0  # leading blocks of block_table already offered to the prefix cache
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    think: ThinkState | None = None  # budget forcing; None = no think phase (all output is answer)
    max_tokens: int = 1  # generated tokens allowed; LLMEngine resolves it from sampling.max_tokens and the budget
    index: int = 0  # sample index within the request (n > 1)
    # The other samples of an n > 1 request, forked off this one (sample 0) once its prompt is computed.
    pending_forks: list["Sequence"] = field(default_factory=list, repr=False)
    # Adaptive thinking: the probe in flight (this sequence waits for it), or the sequence probed.
    probe: "Sequence | None" = field(default=None, repr=False)
    probe_of: "Sequence | None" = field(default=None, repr=False)

    def __post_init__(self):
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
