"""Owns the weights, the KV pool and the forward pass: ScheduledBatch in, one token per sequence out.

Each step packs every scheduled sequence's new tokens into one flat batch (decodes first, then
prefill chunks), writes their K/V through a slot mapping, runs one forward, and samples only the
sequences whose last token was computed (a partial prefill chunk samples nothing).
"""

import torch

from ..errors import InvalidConfigError
from ..models import ModelConfig, load_model
from ..models.loader import safetensors_files
from ..models.packed_linear import onednn_linear_available, pack_linears
from ..models.paged_attention import AttentionMetadata, PrefillMetadata
from .config import EngineConfig
from .sampler import Sample, Sampler
from .scheduler import ScheduledBatch
from .sequence import Sequence

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidConfigError(f"device: {name} was asked for, but this torch sees no CUDA device (use --device cpu or auto)")
    return device


def available_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on `device`: free GPU memory, or MemAvailable on Linux."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux: no check
        return 2**62


def resolve_dtype(name: str, model_config: ModelConfig, device: torch.device) -> torch.dtype:
    """auto: fp32 on CPU (exact and fast enough there), the checkpoint's half type on CUDA."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    if model_config.torch_dtype in ("bfloat16", "float16"):
        return _DTYPES[model_config.torch_dtype]
    return torch.bfloat16


def context_len(config: EngineConfig, cfg: ModelConfig) -> int:
    """Longest sequence (prompt + output) the engine serves, before the KV-pool cap."""
    return min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)


class ModelRunner:
    def __init__(self, model_dir: str, config: EngineConfig, model_config: ModelConfig):
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, model_config, self.device)
        self.block_size = config.block_size
        cfg = model_config
        kv_shape = (config.block_size, cfg.num_key_value_heads, cfg.head_dim)
        bytes_per_block = 2 * cfg.num_hidden_layers * kv_shape[0] * kv_shape[1] * kv_shape[2] * self.dtype.itemsize
        self.num_blocks = config.num_kv_blocks or self._blocks_for_memory(config, cfg, bytes_per_block)
        self._check_memory(model_dir, config, self.num_blocks * bytes_per_block)  # before anything is allocated
        self.model = load_model(model_dir, self.dtype, self.device)
        # fp32 on the CPU: oneDNN with weights packed once (pack_linears picks those layers); else torch's GEMM.
        packed = onednn_linear_available() and pack_linears(self.model, config.max_num_seqs)
        self.linear_backend = "onednn-packed" if packed else "torch"
        # (k/v, layer, block, slot in block, kv head, head_dim)
        self.kv_cache = torch.zeros(
            (2, cfg.num_hidden_layers, self.num_blocks, *kv_shape), dtype=self.dtype, device=self.device
        )
        self.sampler = Sampler()

    def _check_memory(self, model_dir: str, config: EngineConfig, kv_bytes: int) -> None:
        """Refuse a KV pool that, with the weights, does not fit in what the device has free: the
        alternative is an OOM kill with no message. Weights are estimated from the checkpoint
        files (at least 2 bytes per stored parameter, scaled to the serving dtype)."""
        from pathlib import Path

        stored = sum(p.stat().st_size for p in safetensors_files(Path(model_dir)))
        weights = stored * max(1.0, self.dtype.itemsize / 2)
        free = available_memory(self.device)
        if weights + kv_bytes > 0.9 * free:
            flag = "num_kv_blocks" if config.num_kv_blocks else "kv_cache_gib"
            raise InvalidConfigError(
                f"{flag}: the KV cache needs {kv_bytes / 2**30:.1f} GiB and the weights about {weights / 2**30:.1f} GiB,"
                f" but {self.device.type} has {free / 2**30:.1f} GiB free; lower --{flag.replace('_', '-')}"
            )

    @staticmethod
    def _blocks_for_memory(config: EngineConfig, cfg: ModelConfig, bytes_per_block: int) -> int:
        """Blocks that fit in kv_cache_gib, but never more than max_num_seqs full-length sequences
        can use: a small model would otherwise allocate (and zero) gigabytes it cannot fill."""
        usable = config.max_num_seqs * -(-context_len(config, cfg) // config.block_size)
        return max(1, min(int(config.kv_cache_gib * 2**30) // bytes_per_block, usable))

    @torch.inference_mode()
    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """K/V of block `source` into block `destination`, every layer (copy-on-write forks)."""
        for source, destination in pairs:
            self.kv_cache[:, :, destination].copy_(self.kv_cache[:, :, source])

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[list[Sample | None], list[list[Sample]]]:
        """Per scheduled sequence (in batch order): the sampled token with its logprobs (None
        unless asked for), or None for a prefill chunk that does not reach the end; and the first
        tokens of the samples waiting to fork off it (n > 1), drawn from the same logits row."""
        order = sorted(range(len(batch)), key=lambda i: batch.num_new_tokens[i] != 1)  # decodes first, stable
        seqs = [batch.seqs[i] for i in order]
        counts = [batch.num_new_tokens[i] for i in order]
        input_ids, positions, meta, sample_rows = self.prepare_inputs(seqs, counts)
        hidden = self.model(input_ids, positions, self.kv_cache, meta)  # (num_tokens, hidden)

        result: list[Sample | None] = [None] * len(batch)
        forks: list[list[Sample]] = [[] for _ in batch.seqs]
        rows, row_seqs, owners = [], [], []  # owners: (batch index, is a fork's first token)
        for j, row in enumerate(sample_rows):
            if row is None:
                continue
            for seq in (seqs[j], *seqs[j].pending_forks):
                rows.append(row)
                row_seqs.append(seq)
                owners.append((order[j], seq is not seqs[j]))
        if rows:
            logits = self.model.compute_logits(hidden[rows])
            for (i, is_fork), sample in zip(owners, self.sampler(logits, row_seqs)):
                if is_fork:
                    forks[i].append(sample)
                else:
                    result[i] = sample
        return result, forks

    def prepare_inputs(self, seqs: list[Sequence], counts: list[int]):
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int | None] = []
        decode_tables, decode_lens = [], []
        prefill_q, prefill_ctx, prefill_tables = [], [], []
        for seq, n in zip(seqs, counts):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            sample_rows.append(len(input_ids) - 1 if end == seq.num_tokens else None)
            if n == 1:
                decode_tables.append(table)
                decode_lens.append(end)
            else:
                prefill_q.append(n)
                prefill_ctx.append(end)
                prefill_tables.append(table[: -(-end // bs)])
        width = max((len(t) for t in decode_tables), default=0)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, device=self.device),
            num_decode_tokens=len(decode_tables),
            decode_block_tables=torch.tensor([t + [0] * (width - len(t)) for t in decode_tables], device=self.device, dtype=torch.long),
            decode_context_lens=torch.tensor(decode_lens, device=self.device, dtype=torch.long),
            prefill=PrefillMetadata.build(prefill_q, prefill_ctx, prefill_tables, self.device) if prefill_q else None,
        )
        ids = torch.tensor(input_ids, device=self.device)
        pos = torch.tensor(positions, device=self.device)
        return ids, pos, meta, sample_rows
