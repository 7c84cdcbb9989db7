"""The streaming front the network server uses: the engine loop on its own thread, asyncio outside.

`generate()` validates the request in the caller's thread (so a bad request raises right there,
before it reaches the engine) and yields `StepOutput` deltas; leaving the iterator early (client
cancelled or disconnected) aborts the request, which frees its KV blocks at the next step.
"""

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from .config import EngineConfig
from .engine import LLMEngine, Prompt
from ..errors import DuplicateRequestError, RequestNotFoundError
from .outputs import StepOutput
from .params import SamplingParams, ThinkBudget
from .sequence import Sequence

logger = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # of StepOutput | BaseException


class AsyncLLM:
    def __init__(self, model_dir: str | Path, **config):
        self.engine = LLMEngine(model_dir, EngineConfig(**config))
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("add", Sequence) | ("abort", id) | None
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="s1serve-engine", daemon=True)
        self._thread.start()

    async def generate(
        self,
        prompt: Prompt,
        sampling: SamplingParams,
        request_id: str | None = None,
        budget: ThinkBudget | None = None,
    ) -> AsyncIterator[StepOutput]:
        request_id = request_id or f"req-{next(self._ids)}"
        seq = self.engine.make_sequence(request_id, prompt, sampling, budget)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
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
                finished = item.finished
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

    def shutdown(self) -> None:
        self._inbox.put(None)
        self._thread.join()

    # ---- engine thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            # Block for work when idle; otherwise take whatever arrived and keep stepping.
            commands = [self._inbox.get()] if not self.engine.has_unfinished() else []
            while not self._inbox.empty():
                commands.append(self._inbox.get_nowait())
            for command in commands:
                if command is None:
                    self._fail_all(RuntimeError("engine shut down"))
                    return
                self._apply(*command)
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a bug, not a user error: fail every request, keep the thread
                logger.exception("engine step failed")
                for request_id in list(self.engine.sequences):
                    self.engine.abort(request_id)
                self._fail_all(exc)
                continue
            for out in outputs:
                self._publish(out)

    def _apply(self, kind: str, arg) -> None:
        if kind == "add":
            seq: Sequence = arg
            self.engine.add_sequence(seq)
        else:
            try:
                self._publish(self.engine.abort(arg))
            except RequestNotFoundError:
                pass  # already finished

    def _publish(self, item: StepOutput) -> None:
        with self._lock:
            stream = self._streams.get(item.request_id)
            if item.finished:
                self._streams.pop(item.request_id, None)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, exc)
