"""Megatron-style tensor parallelism over torch.distributed (NCCL on CUDA, gloo on the CPU).

Each rank holds a slice of every decoder layer: q/k/v and gate/up are split by output rows
(column-parallel: a rank computes its own attention heads and its share of the MLP), o_proj and
down_proj by input columns (row-parallel: partial sums, one all-reduce each). The embedding, the
final norm and the LM head are replicated: rank 0 alone computes logits, and a replicated LM head
needs no all-gather (s1-32B pays 2 x 0.78 GB per rank for it). When there are fewer KV heads than
ranks, each rank keeps the one KV head its query heads use (vLLM does the same), so KV heads are
replicated rather than split.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import InvalidConfigError
from .config import ModelConfig


@dataclass(frozen=True)
class Shard:
    """This rank's slice of the model (rank 0 of size 1 holds everything)."""

    rank: int = 0
    size: int = 1

    def check(self, cfg: ModelConfig) -> None:
        """Refuse, at start-up, a world size the model's shapes do not split evenly."""
        if self.size == 1:
            return
        if cfg.num_attention_heads % self.size:
            raise InvalidConfigError(f"tensor_parallel_size: {self.size} does not divide the model's"
                                     f" {cfg.num_attention_heads} attention heads")
        kv = cfg.num_key_value_heads
        if kv % self.size and self.size % kv:
            raise InvalidConfigError(f"tensor_parallel_size: {self.size} neither divides nor is a multiple of the model's"
                                     f" {kv} KV heads")
        if cfg.intermediate_size % self.size:
            raise InvalidConfigError(f"tensor_parallel_size: {self.size} does not divide the MLP's intermediate size"
                                     f" {cfg.intermediate_size}")

    def heads(self, cfg: ModelConfig) -> int:
        return cfg.num_attention_heads // self.size

    def kv_heads(self, cfg: ModelConfig) -> int:
        return max(1, cfg.num_key_value_heads // self.size)

    def first_kv_head(self, cfg: ModelConfig) -> int:
        """With at least one KV head per rank, this rank's first; else the one its queries use."""
        return self.rank * cfg.num_key_value_heads // self.size if cfg.num_key_value_heads < self.size \
            else self.rank * self.kv_heads(cfg)

    def intermediate(self, cfg: ModelConfig) -> int:
        return cfg.intermediate_size // self.size

    def rows(self, name: str, cfg: ModelConfig) -> tuple[int, int] | None:
        """(start, length) of the checkpoint rows this rank reads for a column-parallel tensor."""
        proj = name.split(".")[-2]
        hd = cfg.head_dim
        if proj == "q_proj":
            return self.rank * self.heads(cfg) * hd, self.heads(cfg) * hd
        if proj in ("k_proj", "v_proj"):
            return self.first_kv_head(cfg) * hd, self.kv_heads(cfg) * hd
        if proj in ("gate_proj", "up_proj"):
            return self.rank * self.intermediate(cfg), self.intermediate(cfg)
        return None

    def columns(self, name: str, cfg: ModelConfig) -> tuple[int, int] | None:
        """(start, length) of the checkpoint columns this rank reads for a row-parallel weight."""
        proj = name.split(".")[-2]
        if proj == "o_proj":
            return self.rank * self.heads(cfg) * cfg.head_dim, self.heads(cfg) * cfg.head_dim
        if proj == "down_proj":
            return self.rank * self.intermediate(cfg), self.intermediate(cfg)
        return None

    def read(self, name: str, tensor_slice, cfg: ModelConfig) -> torch.Tensor:
        """This rank's part of checkpoint tensor `name`, read from a safetensors slice (only
        those bytes are read). A row-parallel bias is kept by rank 0 alone: it is added once."""
        if self.size == 1:
            return tensor_slice[:]
        rows = self.rows(name, cfg)
        if rows is not None:
            return tensor_slice[rows[0] : rows[0] + rows[1]]
        columns = self.columns(name, cfg)
        if columns is not None:
            if name.endswith(".bias"):
                full = tensor_slice[:]
                return full if self.rank == 0 else torch.zeros_like(full)
            return tensor_slice[:, columns[0] : columns[0] + columns[1]]
        return tensor_slice[:]

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum a row-parallel layer's partial outputs over the ranks (in place)."""
        if self.size > 1:
            dist.all_reduce(x)
        return x
