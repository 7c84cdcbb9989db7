"""The streaming front the network server uses: the engine loop on its own thread, asyncio outside.

`generate()` validates the request in the caller's thread (so a bad request raises right there,
before it reaches the engine) and yields `StepOutput` deltas; leaving the iterator early (client
cancelled or disconnected) aborts the request, which frees its KV blocks at the next step.
"""

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import EngineConfig
from .engine import LLMEngine, Prompt
from ..errors import DuplicateRequestError, RequestNotFoundError, UnavailableError
from .outputs import StepOutput
from .params import SamplingParams, ThinkBudget
from .sequence import Sequence
from .tensor_parallel import WorkerFailure

logger = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # of StepOutput | BaseException


def is_device_error(exc: BaseException) -> bool:
    """A CUDA error (an illegal address, a device assert, ECC): the context is unusable from then
    on, unlike a bug in one step, after which the engine can go on with the other requests."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in ("CUDA error", "CUBLAS_STATUS", "cuDNN error"))


class AsyncLLM:
    """If the engine loop itself fails, the engine is dead: every open and later request fails with
    `UnavailableError`, and `healthy` turns false for good (the server then exits non-zero)."""

    def __init__(self, model_dir: str | Path, **config):
        self.engine = LLMEngine(model_dir, EngineConfig(**config))
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("add", Sequence) | ("abort", id) | None
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self.error: BaseException | None = None  # why the engine loop died; None while it lives
        self.last_step = time.monotonic()  # when the loop last finished a step (or went idle)
        self._thread = threading.Thread(target=self._loop, name="s1serve-engine", daemon=True)
        self._thread.start()

    def healthy(self, stall_s: float = 120.0) -> bool:
        """The loop is alive, every tensor-parallel rank too, and it finished a step within
        `stall_s` or has nothing to do. A dead rank kills the engine (requests fail UNAVAILABLE)."""
        failure = self.engine.runner.failure()
        if failure is not None and self.error is None:
            logger.critical("%s; failing every request", failure)
            self._fail_all(UnavailableError(f"the engine has stopped: {failure}"), dead=WorkerFailure(failure))
        if self.error is not None or not self._thread.is_alive():
            return False
        return not self.engine.has_unfinished() or time.monotonic() - self.last_step < stall_s

    async def generate(
        self,
        prompt: Prompt,
        sampling: SamplingParams,
        request_id: str | None = None,
        budget: ThinkBudget | None = None,
    ) -> AsyncIterator[StepOutput]:
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        # Tokenizing (and chat rendering before it) runs off the event loop: other streams go on.
        seq = await asyncio.to_thread(self.engine.make_sequence, request_id, prompt, sampling, budget)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if self.error is not None:
                raise UnavailableError(f"the engine has stopped: {self.error!r}")
            if request_id in self._streams:
                raise DuplicateRequestError(request_id)
            self._streams[request_id] = stream
        self._inbox.put(("add", seq))
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.request_finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    @property
    def num_waiting(self) -> int:
        """Requests submitted and not yet running (read from another thread: a snapshot)."""
        return len(self.engine.scheduler.waiting) + self._inbox.qsize()

    @property
    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    def abort(self, request_id: str) -> None:
        """Ask the engine to drop a request; it is freed before the next step runs."""
        self._inbox.put(("abort", request_id))

    def abort_all(self) -> None:
        """Drop every request (the end of a drain); their streams end with finish_reason abort."""
        self._inbox.put(("abort_all", None))

    def shutdown(self, timeout_s: float = 30.0) -> None:
        self._inbox.put(None)
        self._thread.join(timeout_s)  # a thread stuck in a collective with a dead rank is a daemon: left behind
        self.engine.runner.shutdown()

    # ---- engine thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # the loop itself failed (not one step): the engine is dead
            logger.critical("engine loop died; failing every request", exc_info=exc)
            self._fail_all(UnavailableError(f"the engine has stopped: {exc!r}"), dead=exc)

    def _run(self) -> None:
        while True:
            # Block for work when idle; otherwise take whatever arrived and keep stepping.
            if not self.engine.has_unfinished():
                commands = [self._inbox.get()]
                self.last_step = time.monotonic()  # idle until now, not stalled
            else:
                commands = []
            while not self._inbox.empty():
                commands.append(self._inbox.get_nowait())
            for command in commands:
                if command is None:
                    self._fail_all(UnavailableError("the engine has shut down"), dead=RuntimeError("shut down"))
                    return
                self._apply(*command)
            try:
                outputs = self.engine.step()
            except WorkerFailure:  # a tensor-parallel rank is gone: the engine is dead
                raise
            except Exception as exc:
                if is_device_error(exc):  # sticky: every later step would fail too, so the engine is dead
                    raise
                logger.exception("engine step failed")
                for request_id in list(self.engine.sequences):
                    self.engine.abort(request_id)
                self._fail_all(exc)
                continue
            self.last_step = time.monotonic()
            for out in outputs:
                self._publish(out)

    def _apply(self, kind: str, arg) -> None:
        if kind == "add":
            seq: Sequence = arg
            try:
                self.engine.add_sequence(seq)
            except Exception as exc:  # that request fails, the loop goes on
                self._fail_one(seq.request_id, exc)
        else:
            for request_id in list(self.engine.sequences) if kind == "abort_all" else [arg]:
                try:
                    for delta in self.engine.abort(request_id):
                        self._publish(delta)
                except RequestNotFoundError:
                    pass  # already finished

    def _publish(self, item: StepOutput) -> None:
        with self._lock:
            stream = self._streams.get(item.request_id)
            if item.request_finished:
                self._streams.pop(item.request_id, None)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _fail_one(self, request_id: str, exc: BaseException) -> None:
        with self._lock:
            stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, exc)

    def _fail_all(self, exc: BaseException, dead: BaseException | None = None) -> None:
        with self._lock:
            if dead is not None:
                self.error = dead  # under the lock: no stream registers after this
            streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, exc)
