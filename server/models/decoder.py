"""Llama-family / Qwen2 / Qwen3 decoder on the paged-attention path (Qwen3 adds per-head q/k RMSNorm).

Differences from transformers' modules are only in layout: q/k/v and gate/up projections are
fused into one matmul each (fewer, larger GEMMs), and attention reads K/V from the paged cache.
The token batch is flat: (num_tokens, hidden) with explicit positions, no padding.
"""

import functools

import torch
from torch import nn

from . import paged_attention as pa
from .config import ModelConfig
from .parallel import Shard


@functools.cache
def _has_fused_ops(device_type: str) -> bool:
    return all(pa.has_csrc_kernel(op, device_type)
               for op in ("rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary_embedding"))


def fused(x: torch.Tensor) -> bool:
    """Whether csrc's fused element-wise ops (csrc/cpu/fused_ops.cpp) take this tensor: the CPU,
    fp32 or bf16. Elsewhere the torch code below runs; both round where transformers rounds."""
    return x.dtype in (torch.float32, torch.bfloat16) and _has_fused_ops(x.device.type)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with `residual`, vLLM's fused form: residual += x, then (norm(residual), residual)."""
        if x.dim() == 2 and x.stride(1) == 1 and fused(x):
            out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            if residual is None:
                torch.ops.s1serve.rms_norm(out, x, self.weight, self.eps)
                return out
            torch.ops.s1serve.fused_add_rms_norm(out, residual, x, self.weight, self.eps)
            return out, residual
        if residual is not None:
            residual = x + residual
            return self._norm(residual), residual
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like the reference implementation, then cast back.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin per position; rotate-half convention (as Llama/Qwen2 checkpoints use)."""

    def __init__(self, head_dim: int, theta: float, max_positions: int):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)  # (max_positions, head_dim)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at the step's positions, (num_tokens, 1, head_dim): gathered once per step
        and shared by every layer."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)

    @staticmethod
    def apply(cos_sin: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor, k: torch.Tensor):
        """q: (num_tokens, num_heads, head_dim), k: (num_tokens, num_kv_heads, head_dim); on the
        fused path rotated in place (they are views of this layer's own qkv output)."""
        cos, sin = cos_sin
        if fused(q):
            torch.ops.s1serve.rotary_embedding(q, k, cos, sin)
            return q, k
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    """This rank's attention heads (all of them without tensor parallelism)."""

    def __init__(self, cfg: ModelConfig, shard: Shard):
        super().__init__()
        self.shard = shard
        self.num_heads = shard.heads(cfg)
        self.num_kv_heads = shard.kv_heads(cfg)
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, x, cos_sin, k_cache, v_cache, meta: pa.AttentionMetadata):
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:  # over each head's head_dim, as Qwen3 does
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = RotaryEmbedding.apply(cos_sin, q, k)
        pa.reshape_and_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        nd = meta.num_decode_tokens
        decode = lambda q: pa.paged_attention_decode(q, k_cache, v_cache, meta.decode_block_tables,
                                                     meta.decode_context_lens, self.scale)
        if meta.prefill is None:  # a decode-only step: no copy into a shared output
            out = decode(q)
        else:
            out = torch.empty_like(q)  # (num_tokens, num_heads, head_dim)
            if nd:
                out[:nd] = decode(q[:nd])
            out[nd:] = pa.paged_attention_prefill(q[nd:], k[nd:], v[nd:], k_cache, v_cache, meta.prefill, self.scale)
        return self.shard.all_reduce(self.o_proj(out.view(-1, self.q_size)))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: Shard):
        super().__init__()
        self.shard = shard
        self.intermediate_size = shard.intermediate(cfg)
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * self.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(self.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        gate_up = self.gate_up_proj(x)
        if fused(gate_up):
            act = torch.empty(gate_up.shape[0], self.intermediate_size, dtype=gate_up.dtype, device=gate_up.device)
            torch.ops.s1serve.silu_and_mul(act, gate_up)
        else:
            gate, up = gate_up.split(self.intermediate_size, dim=-1)
            act = nn.functional.silu(gate) * up
        return self.shard.all_reduce(self.down_proj(act))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: Shard):
        super().__init__()
        self.self_attn = Attention(cfg, shard)
        self.mlp = MLP(cfg, shard)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, residual, cos_sin, k_cache, v_cache, meta):
        """Returns (this layer's output, the residual stream before it): the add is fused into
        the next norm, so the stream is x + residual (residual None: x alone, the first layer)."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, cos_sin, k_cache, v_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: Shard):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, shard) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """Parameter names mirror transformers' (`model.layers.N.self_attn...`) so loading is a rename."""

    def __init__(self, cfg: ModelConfig, shard: Shard = Shard()):
        super().__init__()
        self.config = cfg
        self.shard = shard
        self.model = DecoderModel(cfg, shard)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, positions, kv_cache, meta: pa.AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: (num_tokens,); kv_cache: (2, layers, blocks, block_size, kv_heads, head_dim).

        Returns final hidden states (num_tokens, hidden); `compute_logits` projects the rows we sample.
        """
        x = self.model.embed_tokens(input_ids)
        cos_sin = self.rope.tables(positions, x.dtype)
        residual = None
        k_caches, v_caches = kv_cache[0].unbind(0), kv_cache[1].unbind(0)  # each layer's views, in two calls, not 60
        for layer, k_cache, v_cache in zip(self.model.layers, k_caches, v_caches):
            x, residual = layer(x, residual, cos_sin, k_cache, v_cache, meta)
        return x + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(hidden))
