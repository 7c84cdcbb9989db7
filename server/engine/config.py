"""Engine configuration: one dataclass, validated at construction; CLI flags map 1:1 onto it."""

from dataclasses import dataclass

from ..errors import InvalidConfigError
from .think import THINK_TEMPLATES, ThinkTemplate


@dataclass
class EngineConfig:
    block_size: int = 16  # tokens per KV block
    num_kv_blocks: int | None = None  # KV pool size; None = derive from kv_cache_gib
    kv_cache_gib: float | None = None  # memory for the KV pool; None = 2 on CPU, from gpu_memory_utilization on CUDA
    # share of the GPU's memory for weights, activations and KV pool; the pool gets what a profiling forward leaves
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 64  # sequences running at once
    max_num_batched_tokens: int = 2048  # tokens computed per engine step (prefill chunks + decodes)
    long_prefill_token_threshold: int = 512  # a prompt's tokens per step at most (0: no cap): short requests go beside it
    max_model_len: int | None = None  # prompt + output; None = the model's max_position_embeddings
    enable_prefix_caching: bool = True
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16; auto = bf16 on a CPU with native bf16 (else fp32), the checkpoint's on CUDA
    quantization: str | None = None  # int4: 4-bit weights (groups of 32) for the decode steps; CPU, bf16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0  # seeds requests that carry no seed of their own
    think_template: str | ThinkTemplate = "auto"  # s1 | r1 | qwen3 | auto (from the tokenizer) | a ThinkTemplate
    default_max_tokens: int = 1024  # a request's max_tokens when it sets none (a budgeted one: its answer's room)
    min_answer_tokens: int = 16  # a budgeted request is refused unless its answer can have this many tokens
    # Megatron-style: one GPU per rank on CUDA (NCCL), gloo on the CPU; the engine starts the ranks itself.
    tensor_parallel_size: int = 1  # ranks the model is sharded over; kv_cache_gib and num_kv_blocks are per rank

    def __post_init__(self):
        positive = ("block_size", "max_num_seqs", "max_num_batched_tokens", "default_max_tokens", "min_answer_tokens",
                    "tensor_parallel_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise InvalidConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.long_prefill_token_threshold < 0:
            raise InvalidConfigError(f"long_prefill_token_threshold must be >= 0, got {self.long_prefill_token_threshold}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise InvalidConfigError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_gib is not None and self.kv_cache_gib <= 0:
            raise InvalidConfigError(f"kv_cache_gib must be > 0, got {self.kv_cache_gib}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise InvalidConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise InvalidConfigError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if isinstance(self.think_template, str) and self.think_template not in ("auto", *THINK_TEMPLATES):
            raise InvalidConfigError(f"think_template must be auto, {', '.join(THINK_TEMPLATES)}, got {self.think_template!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise InvalidConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.quantization not in (None, "int4"):
            raise InvalidConfigError(f"quantization must be int4 (or unset), got {self.quantization!r}")
