"""Python clients for a running s1serve: `S1Client` (blocking) and `AsyncS1Client` over gRPC."""

from .client import AsyncS1Client, Completion, S1Client, StreamChunk

__all__ = ["S1Client", "AsyncS1Client", "Completion", "StreamChunk"]
