"""Paged-attention ops, the per-step metadata they read, and their pure-torch references.

K/V live in a block-structured cache of shape (num_blocks, block_size, num_kv_heads, head_dim)
per layer; a token's slot is `block * block_size + offset`. `paged_attention_decode` runs the
csrc/ kernel (`torch.ops.s1serve`) where one is built for the tensors' device and the torch
reference otherwise (so does `reshape_and_cache`); `attention_backend()` says which, and the
engine logs it at start.
"""

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import server._C  # noqa: F401  (registers torch.ops.s1serve; a missing build is an error, not a fallback)


@dataclass
class AttentionMetadata:
    """How the flat token batch of one step maps onto sequences and cache slots.

    Decode sequences (one query token each) come first, then prefill sequences (one or more).
    """

    slot_mapping: torch.Tensor  # (num_tokens,) int64, cache slot of each new token
    num_decode_tokens: int
    decode_block_tables: torch.Tensor  # (num_decodes, max_blocks) int64, padded with 0
    decode_context_lens: torch.Tensor  # (num_decodes,) int64, tokens each decode attends to
    prefill_query_lens: list[int]  # per prefill sequence: new tokens this step
    prefill_context_lens: list[int]  # per prefill sequence: cached + new tokens
    prefill_block_tables: list[torch.Tensor]  # per prefill sequence: (num_blocks,) int64


def reshape_and_cache(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """key/value: (num_tokens, num_kv_heads, head_dim) written at `slot_mapping` into the caches
    (a negative slot writes nothing)."""
    if attention_backend(key.device.type) == "torch-reference":
        reshape_and_cache_reference(key, value, k_cache, v_cache, slot_mapping)
    else:
        torch.ops.s1serve.reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)


def reshape_and_cache_reference(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    keep = slot_mapping >= 0
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping[keep]] = key[keep]
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping[keep]] = value[keep]


# Shape-only implementations, so the ops work under torch.compile and fake tensors (both mutate
# their arguments in place and return nothing).
@torch.library.register_fake("s1serve::reshape_and_cache")
def _(key, value, k_cache, v_cache, slot_mapping) -> None:
    return None


@torch.library.register_fake("s1serve::paged_attention_decode")
def _(out, query, k_cache, v_cache, block_tables, context_lens, scale) -> None:
    return None


@functools.cache
def attention_backend(device_type: str) -> str:
    """Which implementation runs for tensors on a device type; resolved once, not per layer.

    The csrc ops are registered per dispatch key; a device type with every op built runs them.
    """
    key = "CUDA" if device_type == "cuda" else "CPU"
    ops = ("paged_attention_decode", "reshape_and_cache")
    has_kernels = all(torch._C._dispatch_has_kernel_for_dispatch_key(f"s1serve::{op}", key) for op in ops)
    return f"csrc-{device_type}" if has_kernels else "torch-reference"


def paged_attention_decode(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """query: (num_seqs, num_heads, head_dim), one token per sequence -> same shape."""
    if attention_backend(query.device.type) == "torch-reference":
        return paged_attention_decode_reference(query, k_cache, v_cache, block_tables, context_lens, scale)
    out = torch.empty_like(query)
    torch.ops.s1serve.paged_attention_decode(out, query.contiguous(), k_cache, v_cache, block_tables, context_lens, scale)
    return out


def paged_attention_decode_reference(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Pure torch: gather each sequence's blocks into a padded copy, then masked SDPA."""
    num_seqs, max_blocks = block_tables.shape
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    # (num_seqs, max_blocks * block_size, num_kv_heads, head_dim) -> heads first for SDPA
    keys = k_cache[block_tables].view(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)
    values = v_cache[block_tables].view(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)
    valid = torch.arange(max_blocks * block_size, device=query.device)[None, :] < context_lens[:, None]
    out = F.scaled_dot_product_attention(
        query.unsqueeze(2), keys, values, attn_mask=valid[:, None, None, :], scale=scale, enable_gqa=True
    )
    return out.squeeze(2)


def paged_attention_prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: list[torch.Tensor],
    query_lens: list[int],
    context_lens: list[int],
    scale: float,
) -> torch.Tensor:
    """query: (sum(query_lens), num_heads, head_dim) -> same shape; key/value: the new tokens'
    (sum(query_lens), num_kv_heads, head_dim), already written to the cache.

    Sequence i's queries are the last `query_lens[i]` of its `context_lens[i]` tokens (the rest
    came from the prefix cache or an earlier chunk); each attends causally to all before it.
    A sequence with nothing cached attends to its new K/V directly, skipping the cache gather.
    """
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    out = torch.empty_like(query)
    start = 0
    for table, q_len, ctx_len in zip(block_tables, query_lens, context_lens):
        q = query[start : start + q_len].transpose(0, 1)  # (num_heads, q_len, head_dim)
        if q_len == ctx_len:
            keys = key[start : start + q_len].transpose(0, 1)  # (num_kv_heads, q_len, head_dim)
            values = value[start : start + q_len].transpose(0, 1)
            o = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=scale, enable_gqa=True)
        else:
            keys = k_cache[table].view(-1, num_kv_heads, head_dim)[:ctx_len].transpose(0, 1)
            values = v_cache[table].view(-1, num_kv_heads, head_dim)[:ctx_len].transpose(0, 1)
            q_pos = torch.arange(ctx_len - q_len, ctx_len, device=query.device)
            mask = torch.arange(ctx_len, device=query.device)[None, :] <= q_pos[:, None]
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start : start + q_len] = o.transpose(0, 1)
        start += q_len
    return out
