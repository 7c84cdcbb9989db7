"""A request's usage: what the server accumulates over a stream and what the gRPC reply, the REST
reply and the Python client all report. Field names equal those of `s1serve.v1.Usage`."""

from dataclasses import dataclass, fields


@dataclass
class Usage:
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    think_tokens: int = 0
    answer_tokens: int = 0
    completion_tokens: int = 0  # all generated tokens, forced ones included
    num_waits: int = 0
    think_end_forced: bool = False
    finish_reason: str = ""  # stop | length | abort
    time_to_first_token_s: float = 0.0
    time_to_first_answer_token_s: float = 0.0
    total_time_s: float = 0.0
    # Test-time scaling: samples of the request (n), adaptive-thinking probes and their tokens
    # (generated, but not part of any sample: completion_tokens excludes them), and samples whose
    # thinking the probes ended. Tokens above are summed over the samples.
    num_samples: int = 1
    num_probes: int = 0
    probe_tokens: int = 0
    think_converged: int = 0

    def fields(self) -> dict:
        """The usage fields only (subclasses may carry more), e.g. for `pb.Usage(**u.fields())`."""
        return {f.name: getattr(self, f.name) for f in fields(Usage)}

    @classmethod
    def from_pb(cls, message) -> "Usage":
        return cls(**{f.name: getattr(message, f.name) for f in fields(Usage)})
