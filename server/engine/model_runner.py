"""Owns the weights, the KV pool and the forward pass: ScheduledBatch in, one token per sequence out.

Each step packs every scheduled sequence's new tokens into one flat batch (decodes first, then
prefill chunks), writes their K/V through a slot mapping, runs one forward, and samples only the
sequences whose last token was computed (a partial prefill chunk samples nothing).
"""

import torch

from ..errors import InvalidConfigError, UnsupportedModelError
from ..models import ModelConfig, load_model
from ..models.loader import safetensors_files
from ..models.packed_linear import onednn_linear_available, pack_linears
from ..models.paged_attention import (
    CUDA_DECODE_HEAD_DIMS,
    CUDA_DECODE_MAX_GROUP,
    AttentionMetadata,
    PrefillMetadata,
    attention_backend,
    cuda_decode_supported,
)
from ..models.parallel import Shard
from .config import EngineConfig
from .sampler import Sample, Sampler
from .scheduler import ScheduledBatch
from .sequence import Sequence
from .tensor_parallel import StepInputs, WorkerFailure, Workers, rank_device, worker_config

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
    """Rank 0 of the engine (or its only rank). With `tensor_parallel_size` > 1 it starts the
    other ranks (tensor_parallel.py), sends them each step's inputs and samples alone."""

    def __init__(self, model_dir: str, config: EngineConfig, model_config: ModelConfig, rank: int = 0):
        self.shard = Shard(rank, config.tensor_parallel_size)
        self.shard.check(model_config)  # a size the heads do not split: refused before any process starts
        self.device = rank_device(resolve_device(config.device), rank)
        self.dtype = resolve_dtype(config.dtype, model_config, self.device)
        heads = (self.shard.heads(model_config), self.shard.kv_heads(model_config), model_config.head_dim)
        if attention_backend(self.device.type) == "csrc-cuda" and not cuda_decode_supported(*heads):
            raise UnsupportedModelError(
                f"{heads[0]} query heads over {heads[1]} KV heads of dim {heads[2]} per rank: the CUDA decode kernel"
                f" needs head_dim in {CUDA_DECODE_HEAD_DIMS} and at most {CUDA_DECODE_MAX_GROUP} query heads per KV head")
        self.block_size = config.block_size
        cfg = model_config
        # Each rank's pool holds its own KV heads; all ranks have the same number of blocks.
        kv_shape = (config.block_size, self.shard.kv_heads(cfg), cfg.head_dim)
        bytes_per_block = 2 * cfg.num_hidden_layers * kv_shape[0] * kv_shape[1] * kv_shape[2] * self.dtype.itemsize
        self.num_blocks = config.num_kv_blocks or self._blocks_for_memory(config, cfg, bytes_per_block)
        if rank == 0:
            self._check_memory(model_dir, config, self.num_blocks * bytes_per_block)  # before anything is allocated
        self.workers = None
        if rank == 0 and self.shard.size > 1:  # they load their shards while this rank loads its own
            self.workers = Workers(model_dir, worker_config(config, self.num_blocks), model_config)
        self.model = load_model(model_dir, self.dtype, self.device, self.shard)
        # fp32 / bf16 on the CPU: oneDNN with weights packed once (pack_linears picks those layers); else torch's GEMM.
        packed = onednn_linear_available() and pack_linears(self.model, config.max_num_seqs)
        self.linear_backend = "onednn-packed" if packed else "torch"
        # (k/v, layer, block, slot in block, kv head, head_dim)
        self.kv_cache = torch.zeros(
            (2, cfg.num_hidden_layers, self.num_blocks, *kv_shape), dtype=self.dtype, device=self.device
        )
        self.sampler = Sampler()
        self.pending_copies: list[tuple[int, int]] = []  # copy-on-write block copies for the next step

    def shutdown(self) -> None:
        if self.workers is not None:
            self.workers.stop()
            self.workers = None

    def failure(self) -> str | None:
        """Why this engine can no longer run (a tensor-parallel rank died), or None."""
        return self.workers.failure() if self.workers is not None else None

    def _check_memory(self, model_dir: str, config: EngineConfig, kv_bytes: int) -> None:
        """Refuse a KV pool that, with the weights, does not fit in what the device has free: the
        alternative is an OOM kill with no message. Weights are estimated from the checkpoint
        files (at least 2 bytes per stored parameter, scaled to the serving dtype)."""
        from pathlib import Path

        stored = sum(p.stat().st_size for p in safetensors_files(Path(model_dir)))
        weights = stored * max(1.0, self.dtype.itemsize / 2)
        free = available_memory(self.device)
        ranks = self.shard.size
        if self.device.type == "cuda":  # one GPU per rank: its share of the weights and its own pool
            weights /= ranks
        else:  # the ranks share this machine's memory: every pool
            kv_bytes *= ranks
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

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """K/V of block `source` into block `destination`, every layer, on every rank: done at
        the start of the next step, before its forward writes anything (copy-on-write forks)."""
        self.pending_copies += pairs

    @torch.inference_mode()
    def execute(self, step: StepInputs) -> torch.Tensor:
        """One forward on this rank: the block copies, then the batch; the final hidden states."""
        for source, destination in step.copies:
            self.kv_cache[:, :, destination].copy_(self.kv_cache[:, :, source])
        ids, pos, meta = self.tensors(step)
        return self.model(ids, pos, self.kv_cache, meta)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[list[Sample | None], list[list[Sample]]]:
        """Per scheduled sequence (in batch order): the sampled token with its logprobs (None
        unless asked for), or None for a prefill chunk that does not reach the end; and the first
        tokens of the samples waiting to fork off it (n > 1), drawn from the same logits row."""
        order = sorted(range(len(batch)), key=lambda i: batch.num_new_tokens[i] != 1)  # decodes first, stable
        seqs = [batch.seqs[i] for i in order]
        counts = [batch.num_new_tokens[i] for i in order]
        step, sample_rows = self.plan(seqs, counts)
        step.copies, self.pending_copies = self.pending_copies, []
        if self.workers is not None:
            self.workers.broadcast(step)
        try:
            hidden = self.execute(step)  # (num_tokens, hidden)
        except RuntimeError as exc:
            if self.workers is None:
                raise
            raise WorkerFailure(self.workers.failure() or f"tensor-parallel forward failed: {exc}") from None

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

    def plan(self, seqs: list[Sequence], counts: list[int]) -> tuple[StepInputs, list[int | None]]:
        """The step's inputs as plain lists (what the other ranks receive), and per sequence the
        row whose logits it samples from (None for a prefill chunk short of the prompt's end)."""
        bs = self.block_size
        step = StepInputs()
        sample_rows: list[int | None] = []
        for seq, n in zip(seqs, counts):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            step.input_ids += seq.token_ids[start:end]
            step.positions += range(start, end)
            table = seq.block_table
            step.slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            sample_rows.append(len(step.input_ids) - 1 if end == seq.num_tokens else None)
            if n == 1:
                step.decode_tables.append(table)
                step.decode_lens.append(end)
            else:
                step.prefill_q.append(n)
                step.prefill_ctx.append(end)
                step.prefill_tables.append(table[: -(-end // bs)])
        return step, sample_rows

    def tensors(self, step: StepInputs):
        device = self.device
        width = max((len(t) for t in step.decode_tables), default=0)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(step.slots, device=device),
            num_decode_tokens=len(step.decode_tables),
            decode_block_tables=torch.tensor([t + [0] * (width - len(t)) for t in step.decode_tables], device=device, dtype=torch.long),
            decode_context_lens=torch.tensor(step.decode_lens, device=device, dtype=torch.long),
            prefill=PrefillMetadata.build(step.prefill_q, step.prefill_ctx, step.prefill_tables, device) if step.prefill_q else None,
        )
        return torch.tensor(step.input_ids, device=device), torch.tensor(step.positions, device=device), meta

    def prepare_inputs(self, seqs: list[Sequence], counts: list[int]):
        """The forward's tensors for a batch (ids, positions, metadata) and the sample rows."""
        step, sample_rows = self.plan(seqs, counts)
        return *self.tensors(step), sample_rows
