"""The ranks of a tensor-parallel engine: rank 0 is the engine (scheduler, sampler, the fronts);
ranks 1..N-1 are worker processes the engine starts itself (no torchrun) that run the model on
the batch rank 0 sends them.

Transport: torch.distributed only (gloo on the CPU, NCCL on CUDA). Every step rank 0 broadcasts
one `StepInputs` (plain lists: token ids, positions, slots, block tables, the copy-on-write block
copies) with `broadcast_object_list`; every rank then builds the same tensors and runs the same
forward, whose all-reduces meet inside the layers. Forcing decisions stay on rank 0: forced
tokens reach the workers as ordinary tokens of the next step. Failures: a worker that dies is
noticed by `Workers.failure()` (polled by the health check) and the engine is declared dead; a
collective that fails or times out raises `WorkerFailure`, which also kills the engine loop.
"""

import ctypes
import datetime
import logging
import multiprocessing as mp
import signal
import socket
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

from ..errors import S1ServeError

logger = logging.getLogger(__name__)
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)  # a hung rank fails the step after this


class WorkerFailure(S1ServeError):
    """A tensor-parallel rank died or stopped answering: the engine cannot go on."""


@dataclass
class StepInputs:
    """What every rank needs to run one forward: the batch, flattened, as plain lists."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    decode_tables: list[list[int]] = field(default_factory=list)
    decode_lens: list[int] = field(default_factory=list)
    prefill_q: list[int] = field(default_factory=list)
    prefill_ctx: list[int] = field(default_factory=list)
    prefill_tables: list[list[int]] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # KV blocks to copy first (forks)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()) else "gloo"


def init_group(rank: int, size: int, address: str, backend: str) -> None:
    if backend == "nccl":
        torch.cuda.set_device(rank)  # rank r owns cuda:r; NCCL collectives run on the current device
    dist.init_process_group(backend, init_method=address, rank=rank, world_size=size, timeout=COLLECTIVE_TIMEOUT)


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when rank 0 exits, however it exits (even kill -9)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def worker_main(model_dir: str, config, model_config, rank: int, address: str, threads: int) -> None:
    """Rank `rank`: load its shard, then run the forward of every step rank 0 broadcasts."""
    from .model_runner import ModelRunner

    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 drains and then tells us to stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(threads)
    init_group(rank, config.tensor_parallel_size, address, backend_for(config.device))
    runner = ModelRunner(model_dir, config, model_config, rank=rank)
    while True:
        message = [None]
        dist.broadcast_object_list(message, src=0)
        if message[0] is None:  # shutdown
            break
        runner.execute(message[0])
    dist.destroy_process_group()


class Workers:
    """Rank 0's handle on ranks 1..N-1: started with the engine, stopped with it."""

    def __init__(self, model_dir: str, config, model_config):
        size = config.tensor_parallel_size
        address = f"tcp://127.0.0.1:{free_port()}"
        threads = max(1, torch.get_num_threads() // size) if not config.device.startswith("cuda") else 1
        context = mp.get_context("spawn")  # a clean interpreter: rank 0 already has threads
        self.processes = [context.Process(target=worker_main, name=f"s1serve-tp-rank{rank}", daemon=True,
                                          args=(model_dir, config, model_config, rank, address, threads))
                          for rank in range(1, size)]
        for process in self.processes:
            process.start()
        if not config.device.startswith("cuda"):
            torch.set_num_threads(threads)  # the ranks share the CPU's cores
        init_group(0, size, address, backend_for(config.device))
        logger.info("tensor parallel: %d ranks on %s (%s)", size, config.device, dist.get_backend())

    def failure(self) -> str | None:
        """Why the workers can no longer serve (a rank exited), or None."""
        for rank, process in enumerate(self.processes, start=1):
            if not process.is_alive():
                return f"tensor-parallel rank {rank} died (exit code {process.exitcode})"
        return None

    def broadcast(self, step: StepInputs | None) -> None:
        try:
            dist.broadcast_object_list([step], src=0)
        except (RuntimeError, ValueError) as exc:  # a peer is gone or timed out
            raise WorkerFailure(self.failure() or f"tensor-parallel broadcast failed: {exc}") from None

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.failure() is None:
            try:
                self.broadcast(None)
            except WorkerFailure:
                pass
        for process in self.processes:
            process.join(timeout_s)
            if process.is_alive():
                process.kill()
        if dist.is_initialized():
            dist.destroy_process_group()


def worker_config(config, num_blocks: int | None):
    """What the workers run with: rank 0's config with its KV pool size, so every pool matches, or
    (None) with no size, when every rank profiles its GPU and they agree on one."""
    return replace(config, num_kv_blocks=num_blocks)


def smallest_across_ranks(value: int, device: torch.device) -> int:
    """The smallest of every rank's `value` (each rank calls this with its own): the KV pool size
    that fits on every GPU. Alone (no process group), `value` itself."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    held = torch.tensor([value], dtype=torch.long, device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(held, op=dist.ReduceOp.MIN)
    return int(held.item())


def rank_device(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device.type == "cuda" else device

