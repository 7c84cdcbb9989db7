"""The serving engine: paged KV cache, continuous batching, prefix caching, preemption.

Contract (see DESIGN.md): `LLM(model_dir, **config).generate(prompts, sampling, budget=None)`;
`AsyncLLM` for streaming fronts.
"""

from .async_llm import AsyncLLM
from .config import EngineConfig
from .engine import LLMEngine
from ..errors import (
    EmptyPromptError,
    InvalidRequestError,
    InvalidSamplingParamError,
    PromptTooLongError,
    S1ServeError,
)
from .llm import LLM
from .outputs import RequestOutput, StepOutput
from .params import AdaptiveThinking, SamplingParams, ThinkBudget
from .think import THINK_TEMPLATES, ThinkTemplate

__all__ = [
    "LLM",
    "AsyncLLM",
    "LLMEngine",
    "EngineConfig",
    "SamplingParams",
    "ThinkBudget",
    "AdaptiveThinking",
    "ThinkTemplate",
    "THINK_TEMPLATES",
    "RequestOutput",
    "StepOutput",
    "S1ServeError",
    "InvalidRequestError",
    "InvalidSamplingParamError",
    "EmptyPromptError",
    "PromptTooLongError",
]
