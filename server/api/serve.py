"""`s1serve serve`: one engine, the gRPC front and the REST front in one process and one event loop.

Start-up order: load the model, warm it up (one short generation), start both fronts, then flip
health to SERVING. SIGTERM/SIGINT: health goes NOT_SERVING, new requests are refused, in-flight
requests finish (up to `drain_timeout_s`), then the engine stops.
"""

import asyncio
import logging
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from ..engine import AsyncLLM, SamplingParams
from ..models.paged_attention import attention_backend, prefill_backend
from .config import ServerConfig
from .frontend import Frontend
from .grpc_server import build_grpc_server, set_serving
from .http_server import HttpFront

logger = logging.getLogger(__name__)


@dataclass
class S1Server:
    model_dir: str
    config: ServerConfig = field(default_factory=ServerConfig)
    engine_config: dict = field(default_factory=dict)

    async def start(self) -> None:
        cfg = self.config
        self.llm = AsyncLLM(self.model_dir, **self.engine_config)
        name = cfg.served_model_name or Path(self.model_dir).name
        self.frontend = Frontend(self.llm, name, cfg.max_waiting_requests, cfg.reasoning_efforts, cfg.max_prompt_chars)
        tls = None
        if cfg.tls_cert or cfg.tls_key:
            tls = (Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())
        self.grpc, self.health, self.grpc_port = build_grpc_server(
            self.frontend, f"{cfg.host}:{cfg.grpc_port}", cfg.api_keys, tls
        )
        await set_serving(self.health, False)
        await self.grpc.start()
        self.http = HttpFront(self.frontend, cfg.api_keys)
        # handler_cancellation: a client that disconnects cancels its handler, which aborts its request.
        self.runner = web.AppRunner(self.http.app, access_log=None, handler_cancellation=True)
        await self.runner.setup()
        ssl_context = None
        if tls:
            import ssl

            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(cfg.tls_cert, cfg.tls_key)
        site = web.TCPSite(self.runner, cfg.host, cfg.http_port, ssl_context=ssl_context)
        await site.start()
        self.http_port = self.runner.addresses[0][1]
        async for _ in self.llm.generate("warm-up", SamplingParams(temperature=0, max_tokens=2)):
            pass
        await set_serving(self.health, True)
        self.http.ready = True
        engine = self.llm.engine
        template = engine.think_template.name if engine.think_template else "none"
        device = engine.runner.device.type
        blocks, block_size = engine.block_manager.num_blocks, engine.config.block_size
        # Printed whatever the log level: an operator sees where it listens and that it is ready.
        print(f"s1serve: ready: {name} ({engine.model_config.model_type} on {engine.runner.device}/{engine.runner.dtype},"
              f" max_model_len {engine.max_model_len}, think template {template}); gRPC {cfg.host}:{self.grpc_port},"
              f" HTTP {cfg.host}:{self.http_port}; attention {attention_backend(device)} (prefill {prefill_backend(device)}),"
              f" linear {engine.runner.linear_backend}, KV cache {blocks * block_size:,} tokens ({blocks} blocks x {block_size})",
              flush=True)

    async def stop(self) -> None:
        """Drain: refuse new work, let in-flight requests finish, then stop everything."""
        await set_serving(self.health, False)
        self.http.ready = False
        self.frontend.draining = True  # admission refuses from now on
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.drain_timeout_s
        while self.llm.engine.has_unfinished() and loop.time() < deadline and self.llm.error is None:
            await asyncio.sleep(0.05)
        if self.llm.engine.has_unfinished() and self.llm.error is None:  # the drain timed out: end what is left, on both fronts
            logger.warning("drain timeout (%g s): aborting the requests still running", self.config.drain_timeout_s)
            self.llm.abort_all()
            while self.llm.engine.has_unfinished() and loop.time() < deadline + 5:
                await asyncio.sleep(0.05)
        await self.grpc.stop(grace=1.0)
        await self.runner.cleanup()
        self.llm.shutdown()

    async def watch_engine(self, stop: asyncio.Event, period_s: float = 1.0) -> None:
        """Health follows the engine: a dead or stalled engine turns both probes NOT_SERVING; a
        dead one also stops the server (exit code 1), so the orchestrator replaces the process."""
        serving = True
        while not stop.is_set():
            healthy = self.llm.healthy()
            if healthy != serving:
                serving = healthy
                await set_serving(self.health, healthy)
                logger.error("engine %s", "healthy again" if healthy else "not healthy: health is NOT_SERVING")
            if self.llm.error is not None:
                self.exit_code = 1
                stop.set()
            await asyncio.sleep(period_s)

    async def serve_forever(self) -> int:
        """Serve until SIGTERM / SIGINT (then drain) or the engine dies; returns the exit code."""
        await self.start()
        self.exit_code = 0
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        watchdog = asyncio.create_task(self.watch_engine(stop))
        await stop.wait()
        watchdog.cancel()
        if self.exit_code:
            logger.critical("the engine died (%r): stopping", self.llm.error)
        else:
            logger.info("signal received: draining in-flight requests")
        await self.stop()
        return self.exit_code


class BackgroundServer:
    """An S1Server on its own thread and event loop (uvloop), for tests, benchmarks and notebooks."""

    def __init__(self, model_dir: str, config: ServerConfig | None = None, **engine_config):
        self.server = S1Server(str(model_dir), config or ServerConfig(host="127.0.0.1", grpc_port=0, http_port=0),
                               engine_config)
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="s1serve-server", daemon=True)

    def _run(self) -> None:
        import uvloop

        self.loop = uvloop.new_event_loop()
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.start())
        except BaseException as exc:  # surfaced to the starting thread
            self._error = exc
            self._started.set()
            return
        self._started.set()
        self.loop.run_forever()

    def __enter__(self) -> "BackgroundServer":
        self._thread.start()
        self._started.wait()
        if self._error:
            raise self._error
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(timeout=120)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.server.http_port}"
