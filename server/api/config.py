"""Network-server settings; `s1serve serve` maps them 1:1 onto flags (engine settings are EngineConfig)."""

from dataclasses import dataclass


@dataclass
class ServerConfig:
    host: str = "0.0.0.0"
    grpc_port: int = 50051  # 0 = any free port
    http_port: int = 8000  # 0 = any free port
    api_key: str | None = None
    tls_cert: str | None = None  # PEM files; both or neither
    tls_key: str | None = None
    max_waiting_requests: int = 256  # past this, RESOURCE_EXHAUSTED / 429
    # OpenAI's reasoning_effort, mapped to max_think (a request's own max_think wins).
    reasoning_effort_low: int = 256
    reasoning_effort_medium: int = 1024
    reasoning_effort_high: int = 4096
    drain_timeout_s: float = 30.0
    served_model_name: str | None = None  # default: the model directory's name

    @property
    def reasoning_efforts(self) -> dict[str, int]:
        return {"low": self.reasoning_effort_low, "medium": self.reasoning_effort_medium, "high": self.reasoning_effort_high}
