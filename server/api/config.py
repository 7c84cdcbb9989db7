"""Network-server settings; `s1serve serve` maps them 1:1 onto flags (engine settings are EngineConfig)."""

import errno
import socket
from dataclasses import dataclass

from ..errors import InvalidConfigError


@dataclass
class ServerConfig:
    host: str = "0.0.0.0"
    grpc_port: int = 50051  # 0 = any free port
    http_port: int = 8000  # 0 = any free port
    # One key, or several comma-separated: each key is its own tenant, and Abort / Feedback act only
    # on requests made with the same key (ids never collide across keys).
    api_key: str | None = None
    tls_cert: str | None = None  # PEM files; both or neither
    tls_key: str | None = None
    max_waiting_requests: int = 256  # past this, RESOURCE_EXHAUSTED / 429
    max_prompt_chars: int = 1_000_000  # a prompt (or all messages) longer than this is refused before tokenizing
    # OpenAI's reasoning_effort, mapped to max_think (a request's own max_think wins).
    reasoning_effort_low: int = 256
    reasoning_effort_medium: int = 1024
    reasoning_effort_high: int = 4096
    drain_timeout_s: float = 30.0
    served_model_name: str | None = None  # default: the model directory's name

    def __post_init__(self) -> None:
        for name in ("grpc_port", "http_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise InvalidConfigError(f"{name}: {port} is not a TCP port (0-65535; 0 = any free port)")
        if self.grpc_port and self.grpc_port == self.http_port:
            raise InvalidConfigError(f"http_port: {self.http_port} is the gRPC port too")
        for name in ("max_waiting_requests", "drain_timeout_s", "max_prompt_chars"):
            if getattr(self, name) < 0:
                raise InvalidConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for effort, value in self.reasoning_efforts.items():
            if value < 1:
                raise InvalidConfigError(f"reasoning_effort_{effort}: must be >= 1, got {value}")

    @property
    def api_keys(self) -> list[str]:
        return [k.strip() for k in (self.api_key or "").split(",") if k.strip()]

    def check_ports_free(self) -> None:
        """Fail in one line before the model loads when a port is taken (no port sharing: two
        servers on one port would split the traffic between two models)."""
        for name in ("grpc_port", "http_port"):
            port = getattr(self, name)
            if not port:
                continue
            with socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "in use"
                try:
                    sock.bind((self.host, port))
                except OSError as exc:
                    why = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
                    raise InvalidConfigError(f"{name}: {self.host}:{port} {why}") from None

    @property
    def reasoning_efforts(self) -> dict[str, int]:
        return {"low": self.reasoning_effort_low, "medium": self.reasoning_effort_medium, "high": self.reasoning_effort_high}
