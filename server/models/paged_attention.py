"""Paged-attention ops, the per-step metadata they read, and their pure-torch references.

K/V live in a block-structured cache of shape (num_blocks, block_size, num_kv_heads, head_dim)
per layer; a token's slot is `block * block_size + offset`. `paged_attention_decode` runs the
csrc/ kernel (`torch.ops.s1serve`) where one is built for the tensors' device and the torch
reference otherwise (so does `reshape_and_cache`); `attention_backend()` says which.
`paged_attention_prefill` takes a varlen batch (cu_seqlens) and runs our kernel on the CPU and
flash-attn or SDPA on CUDA (`prefill_backend()` says which), except that chunks after cached
context run on csrc/cuda's kernels: short ones on the decode kernel, longer ones (fp16/bf16) on
the paged prefill kernel, both reading the cache in place. The engine logs both at start.
"""

import functools
import importlib.util
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import server._C


def has_csrc_kernel(op: str, device_type: str) -> bool:
    """Whether csrc registered `torch.ops.s1serve.<op>` for tensors on this device type (the ops
    are registered per dispatch key: the CPU kernels always, the CUDA ones in CUDA builds)."""
    key = "CUDA" if device_type == "cuda" else "CPU"
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"s1serve::{op}", key)


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`. To a GPU it goes through pinned memory without blocking the host
    (the caching host allocator keeps the buffer alive until the copy is done); the CPU keeps it."""
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


@dataclass
class PrefillMetadata:
    """A varlen batch of prefill chunks, in flash-attn's convention: sequence i's queries are rows
    cu_seqlens_q[i]:cu_seqlens_q[i+1] of the batch, the last of its
    cu_seqlens_k[i+1] - cu_seqlens_k[i] tokens (the rest came from the prefix cache or an earlier
    chunk), and attend causally with the mask aligned bottom-right."""

    cu_seqlens_q: torch.Tensor  # (num_prefills + 1,) int32
    cu_seqlens_k: torch.Tensor  # (num_prefills + 1,) int32
    block_tables: torch.Tensor  # (num_prefills, max_blocks) int64, padded with 0
    max_seqlen_q: int
    max_seqlen_k: int
    query_lens: list[int]  # host copies of the lengths, for paths that loop over sequences
    context_lens: list[int]

    @classmethod
    def build(cls, query_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
              device: torch.device) -> "PrefillMetadata":
        width = max(len(t) for t in block_tables)
        cu = lambda lens: torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)
        return cls(
            cu_seqlens_q=cu(query_lens),
            cu_seqlens_k=cu(context_lens),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.long, device=device),
            max_seqlen_q=max(query_lens),
            max_seqlen_k=max(context_lens),
            query_lens=query_lens,
            context_lens=context_lens,
        )

    @property
    def has_cached_context(self) -> bool:
        return self.query_lens != self.context_lens

    @functools.cached_property
    def query_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every query row as a decode row: its sequence's block table and the length of its
        causal prefix (ctx - q_len + j + 1 for the j-th new token). Built on the first layer
        that asks, then shared by the step's other layers."""
        seqs = [i for i, n in enumerate(self.query_lens) for _ in range(n)]
        lens = [c - q + j + 1 for q, c in zip(self.query_lens, self.context_lens) for j in range(q)]
        device = self.block_tables.device
        rows = to_device(torch.tensor([seqs, lens], dtype=torch.long), device)
        return self.block_tables.index_select(0, rows[0]), rows[1]


@dataclass
class AttentionMetadata:
    """How the flat token batch of one step maps onto sequences and cache slots.

    Decode sequences (one query token each) come first, then prefill sequences (one or more).
    """

    slot_mapping: torch.Tensor  # (num_tokens,) int64, cache slot of each new token
    num_decode_tokens: int
    decode_block_tables: torch.Tensor  # (num_decodes, max_blocks) int64, padded with 0
    decode_context_lens: torch.Tensor  # (num_decodes,) int64, tokens each decode attends to
    prefill: PrefillMetadata | None


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


@torch.library.register_fake("s1serve::paged_attention_prefill")
def _(out, query, k_cache, v_cache, block_tables, cu_seqlens_q, cu_seqlens_k, scale) -> None:
    return None


@functools.cache
def attention_backend(device_type: str) -> str:
    """Which implementation runs for tensors on a device type; resolved once, not per layer.

    The csrc ops are registered per dispatch key; a device type with every op built runs them.
    """
    has_kernels = all(has_csrc_kernel(op, device_type) for op in ("paged_attention_decode", "reshape_and_cache"))
    return f"csrc-{device_type}" if has_kernels else "torch-reference"


CUDA_DECODE_HEAD_DIMS, CUDA_DECODE_MAX_GROUP = (16, 32, 64, 128, 256), 8  # csrc/cuda/kernels.h decode_supported()


def cuda_decode_supported(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether csrc/cuda's decode kernel covers this attention shape (the same rule as the kernel's
    `decode_supported`): checked when the engine starts, not at its first decode step."""
    return (head_dim in CUDA_DECODE_HEAD_DIMS and num_kv_heads > 0 and num_heads % num_kv_heads == 0
            and num_heads // num_kv_heads <= CUDA_DECODE_MAX_GROUP)


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
    meta: PrefillMetadata,
    scale: float,
) -> torch.Tensor:
    """query: (total_q, num_heads, head_dim) -> same shape; key/value: the new tokens'
    (total_q, num_kv_heads, head_dim), already written to the cache."""
    backend = prefill_backend(query.device.type)
    if backend != "csrc-cpu" and through_decode_kernel(query.device.type, meta):
        return prefill_through_decode(query, k_cache, v_cache, meta, scale)
    if backend == "csrc-cpu" or through_paged_prefill_kernel(query, meta):
        out = torch.empty_like(query)
        torch.ops.s1serve.paged_attention_prefill(
            out, query.contiguous(), k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q, meta.cu_seqlens_k, scale
        )
        return out
    if backend == "flash-attn" and query.dtype in (torch.float16, torch.bfloat16):  # its only dtypes
        return prefill_flash_attn(query, key, value, k_cache, v_cache, meta, scale)
    return prefill_sdpa(query, key, value, k_cache, v_cache, meta, scale)


@functools.cache
def prefill_backend(device_type: str) -> str:
    """CUDA: flash-attn's varlen kernel when the `gpu` extra is installed (fp16/bf16; fp32 runs
    SDPA), else torch SDPA (which has FlashAttention-2 built in on sm80+). CPU: our kernel, which
    bench/kernels.py measured faster than per-sequence SDPA on whole prompts and on chunks after a
    cached context (figures in the README)."""
    if device_type == "cuda":
        return "flash-attn" if importlib.util.find_spec("flash_attn") is not None else "sdpa"
    if has_csrc_kernel("paged_attention_prefill", "cpu"):
        return "csrc-cpu"
    return "sdpa"


# Prefill chunks of at most this many tokens per sequence that follow cached context run on the
# decode kernel (see through_decode_kernel): budget forcing's Wait and forced end are 1-10 tokens.
DECODE_KERNEL_MAX_QUERY = 64


def through_decode_kernel(device_type: str, meta: PrefillMetadata) -> bool:
    """On CUDA, short chunks after cached context (every Wait and forced end of budget forcing,
    a follow-up turn's new tokens) read the cache in place through the split-KV decode kernel,
    one query row at a time, instead of gathering the whole context every layer for flash-attn
    or SDPA (~64 MiB per layer at 32k). Longer chunks run the paged prefill kernel
    (through_paged_prefill_kernel), whose tiles of query rows share each K/V tile."""
    return (device_type == "cuda" and attention_backend("cuda") == "csrc-cuda" and meta.has_cached_context
            and meta.max_seqlen_q <= DECODE_KERNEL_MAX_QUERY)


def through_paged_prefill_kernel(query: torch.Tensor, meta: PrefillMetadata) -> bool:
    """On CUDA, longer chunks after cached context (fp16/bf16) run csrc/cuda's paged prefill
    kernel, which reads the context through the block tables on tensor cores: no per-layer gather
    of the whole context for flash-attn or SDPA. Whole prompts keep flash-attn (or SDPA)."""
    return (query.device.type == "cuda" and meta.has_cached_context and query.dtype in (torch.float16, torch.bfloat16)
            and attention_backend("cuda") == "csrc-cuda" and has_csrc_kernel("paged_attention_prefill", "cuda"))


def prefill_through_decode(query, k_cache, v_cache, meta: PrefillMetadata, scale: float) -> torch.Tensor:
    """Each query row attends to its causal prefix through its sequence's block table: the same
    result as the bottom-right causal mask, with nothing gathered."""
    tables, lens = meta.query_rows
    return paged_attention_decode(query, k_cache, v_cache, tables, lens, scale)


def prefill_flash_attn(query, key, value, k_cache, v_cache, meta: PrefillMetadata, scale: float) -> torch.Tensor:
    """One varlen call for the batch. Chunks with cached context read it through a gather of
    their slots (flash-attn's own paged mode needs blocks of 256 tokens); the engine sends those
    to the csrc kernels instead, so this gather runs only without them (and in tests)."""
    from flash_attn import flash_attn_varlen_func

    if meta.has_cached_context:
        key, value = gather_context(k_cache, v_cache, meta)
    return flash_attn_varlen_func(
        query, key, value, meta.cu_seqlens_q, meta.cu_seqlens_k, meta.max_seqlen_q, meta.max_seqlen_k,
        softmax_scale=scale, causal=True,
    )


def gather_context(k_cache: torch.Tensor, v_cache: torch.Tensor, meta: PrefillMetadata):
    """Every prefill sequence's whole context, packed by cu_seqlens_k: (total_k, kv_heads, head_dim)."""
    block_size = k_cache.shape[1]
    positions = torch.cat([torch.arange(n, device=k_cache.device) for n in meta.context_lens])
    seq_of = torch.repeat_interleave(
        torch.arange(len(meta.context_lens), device=k_cache.device),
        torch.tensor(meta.context_lens, device=k_cache.device),
    )
    slots = meta.block_tables[seq_of, positions // block_size] * block_size + positions % block_size
    return k_cache.flatten(0, 1)[slots], v_cache.flatten(0, 1)[slots]


def prefill_sdpa(query, key, value, k_cache, v_cache, meta: PrefillMetadata, scale: float) -> torch.Tensor:
    """One SDPA call per sequence. A sequence with nothing cached attends to its new K/V directly;
    one with cached context reads the cache with an explicit bottom-right causal mask."""
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    out = torch.empty_like(query)
    start = 0
    for i, (q_len, ctx_len) in enumerate(zip(meta.query_lens, meta.context_lens)):
        q = query[start : start + q_len].transpose(0, 1)  # (num_heads, q_len, head_dim)
        if q_len == ctx_len:
            keys = key[start : start + q_len].transpose(0, 1)  # (num_kv_heads, q_len, head_dim)
            values = value[start : start + q_len].transpose(0, 1)
            o = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=scale, enable_gqa=True)
        else:
            table = meta.block_tables[i, : -(-ctx_len // block_size)]
            keys = k_cache[table].view(-1, num_kv_heads, head_dim)[:ctx_len].transpose(0, 1)
            values = v_cache[table].view(-1, num_kv_heads, head_dim)[:ctx_len].transpose(0, 1)
            q_pos = torch.arange(ctx_len - q_len, ctx_len, device=query.device)
            mask = torch.arange(ctx_len, device=query.device)[None, :] <= q_pos[:, None]
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start : start + q_len] = o.transpose(0, 1)
        start += q_len
    return out


def paged_attention_prefill_reference(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: PrefillMetadata, scale: float
) -> torch.Tensor:
    """Pure torch, reading only the cache: gather each context, softmax(QK^T) V with the mask."""
    _, num_kv_heads, head_dim = k_cache.shape[1:]
    keys, values = gather_context(k_cache, v_cache, meta)
    out = torch.empty_like(query)
    for i, (q_len, ctx_len) in enumerate(zip(meta.query_lens, meta.context_lens)):
        q0, k0 = int(meta.cu_seqlens_q[i]), int(meta.cu_seqlens_k[i])
        q = query[q0 : q0 + q_len].transpose(0, 1)  # (num_heads, q_len, head_dim)
        k = keys[k0 : k0 + ctx_len].transpose(0, 1).repeat_interleave(query.shape[1] // num_kv_heads, dim=0)
        v = values[k0 : k0 + ctx_len].transpose(0, 1).repeat_interleave(query.shape[1] // num_kv_heads, dim=0)
        scores = (q @ k.transpose(1, 2)) * scale
        visible = torch.arange(ctx_len)[None, :] <= torch.arange(ctx_len - q_len, ctx_len)[:, None]
        scores = scores.masked_fill(~visible.to(scores.device), float("-inf"))
        out[q0 : q0 + q_len] = (scores.softmax(-1) @ v).transpose(0, 1)
    return out
