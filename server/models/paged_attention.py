"""Paged-attention ops in plain torch, and the per-step metadata they read.

K/V live in a block-structured cache of shape (num_blocks, block_size, num_kv_heads, head_dim)
per layer; a token's slot is `block * block_size + offset`. These functions are the reference
semantics; the csrc/ kernels replace them behind the same signatures.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
    """key/value: (num_tokens, num_kv_heads, head_dim) written at `slot_mapping` into the caches."""
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping] = key
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping] = value


def paged_attention_decode(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """query: (num_seqs, num_heads, head_dim), one token per sequence -> same shape."""
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
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: list[torch.Tensor],
    query_lens: list[int],
    context_lens: list[int],
    scale: float,
) -> torch.Tensor:
    """query: (sum(query_lens), num_heads, head_dim) -> same shape.

    Sequence i's queries are the last `query_lens[i]` of its `context_lens[i]` tokens (the rest
    came from the prefix cache or an earlier chunk); each attends causally to all before it.
    """
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    out = torch.empty_like(query)
    start = 0
    for table, q_len, ctx_len in zip(block_tables, query_lens, context_lens):
        q = query[start : start + q_len].transpose(0, 1)  # (num_heads, q_len, head_dim)
        keys = k_cache[table].view(-1, num_kv_heads, head_dim)[:ctx_len].transpose(0, 1)
        values = v_cache[table].view(-1, num_kv_heads, head_dim)[:ctx_len].transpose(0, 1)
        if q_len == ctx_len:
            o = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=scale, enable_gqa=True)
        else:
            q_pos = torch.arange(ctx_len - q_len, ctx_len, device=query.device)
            mask = torch.arange(ctx_len, device=query.device)[None, :] <= q_pos[:, None]
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start : start + q_len] = o.transpose(0, 1)
        start += q_len
    return out
