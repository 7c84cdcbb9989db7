"""Owns the weights, the KV pool and the forward pass: ScheduledBatch in, one token per sequence out.

Each step packs every scheduled sequence's new tokens into one flat batch (decodes first, then
prefill chunks), writes their K/V through a slot mapping, runs one forward, and samples only the
sequences whose last token was computed (a partial prefill chunk samples nothing).
"""

import itertools
from dataclasses import dataclass

import torch

from ..errors import InvalidConfigError, UnsupportedModelError
from ..models import ModelConfig, load_model
from ..models.loader import safetensors_files
from ..models.packed_linear import PackedLinear, cpu_has_native_bf16, onednn_linear_available, pack_linears
from ..models.paged_attention import (
    CUDA_DECODE_HEAD_DIMS,
    CUDA_DECODE_MAX_GROUP,
    AttentionMetadata,
    PrefillMetadata,
    attention_backend,
    cuda_decode_supported,
    to_device,
)
from ..models.parallel import Shard
from .config import EngineConfig
from .sampler import Sample, Sampler
from .scheduler import ScheduledBatch
from .sequence import Sequence
from .tensor_parallel import StepInputs, WorkerFailure, Workers, rank_device, smallest_across_ranks, worker_config

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
    """auto: on the CPU bf16 where it has native bf16 (1.4x faster per stream and 1.8x in
    throughput here: bench/cpu_dtypes.py), else fp32; on CUDA the checkpoint's half type."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if model_config.torch_dtype in ("bfloat16", "float16"):
        return _DTYPES[model_config.torch_dtype]
    return torch.bfloat16


def context_len(config: EngineConfig, cfg: ModelConfig) -> int:
    """Longest sequence (prompt + output) the engine serves, before the KV-pool cap."""
    return min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)


@dataclass
class GpuMemory:
    free: int  # on the device, all processes
    total: int
    allocated: int  # by this process's torch tensors
    reserved: int  # by this process's caching allocator


def gpu_memory(device: torch.device) -> GpuMemory:
    free, total = torch.cuda.mem_get_info(device)
    return GpuMemory(free, total, torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device))


def kv_bytes_for_gpu(total: int, free_at_start: int, utilization: float, peak_torch: int, non_torch: int) -> int:
    """vLLM's rule: this engine may use `utilization` of the GPU; the KV pool gets what the
    weights and the profiled peak activations (`peak_torch`) and memory outside torch's
    allocator (`non_torch`) leave of it. Refused when other processes hold memory it would need."""
    gib = 2**30
    requested = int(total * utilization)
    if requested > free_at_start:
        raise InvalidConfigError(
            f"gpu_memory_utilization: {utilization:g} of {total / gib:.1f} GiB is {requested / gib:.1f} GiB, but only"
            f" {free_at_start / gib:.1f} GiB was free at start-up (another process holds the rest); lower it")
    kv_bytes = requested - peak_torch - non_torch
    if kv_bytes <= 0:
        raise InvalidConfigError(
            f"gpu_memory_utilization: {requested / gib:.1f} GiB leaves nothing for the KV cache after the weights and"
            f" activations ({(peak_torch + non_torch) / gib:.1f} GiB); raise it or lower --max-num-batched-tokens")
    return kv_bytes


class ModelRunner:
    """Rank 0 of the engine (or its only rank). With `tensor_parallel_size` > 1 it starts the
    other ranks (tensor_parallel.py), sends them each step's inputs and samples alone."""

    def __init__(self, model_dir: str, config: EngineConfig, model_config: ModelConfig, rank: int = 0):
        self.shard = Shard(rank, config.tensor_parallel_size)
        self.shard.check(model_config)  # a size the heads do not split: refused before any process starts
        self.device = rank_device(resolve_device(config.device), rank)
        self.dtype = resolve_dtype(config.dtype, model_config, self.device)
        if config.quantization and (self.device.type != "cpu" or self.dtype != torch.bfloat16 or not onednn_linear_available()):
            raise InvalidConfigError(
                f"quantization: {config.quantization} runs on the CPU in bfloat16 (torch's int4 kernel), here the"
                f" engine runs {self.device.type} in {str(self.dtype).removeprefix('torch.')}; drop --quantization"
                " or pass --device cpu --dtype bfloat16")
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
        # On GPUs with no explicit pool size, the pool is what a profiling forward leaves of
        # gpu_memory_utilization; tensor-parallel ranks each run it (together: the forward's
        # all-reduces) and take the smallest pool any of them fits. The CPU sizes from kv_cache_gib.
        profile = self.device.type == "cuda" and config.num_kv_blocks is None and config.kv_cache_gib is None
        at_start = gpu_memory(self.device) if profile else None
        self.num_blocks = config.num_kv_blocks or (0 if profile else self._blocks_for_memory(config, cfg, bytes_per_block))
        if rank == 0 and not profile:
            self._check_memory(model_dir, config, self.num_blocks * bytes_per_block)  # before anything is allocated
        self.workers = None
        if rank == 0 and self.shard.size > 1:  # they load their shards while this rank loads its own
            self.workers = Workers(model_dir, worker_config(config, None if profile else self.num_blocks), model_config)
        self.model = load_model(model_dir, self.dtype, self.device, self.shard)
        # fp32 / bf16 on the CPU: oneDNN with weights packed once (pack_linears picks those layers); else torch's GEMM.
        packed = onednn_linear_available() and pack_linears(self.model, config.max_num_seqs, config.quantization)
        tiles = {m.tile_kernel for m in self.model.modules() if isinstance(m, PackedLinear) and m.tile_weight is not None}
        self.linear_backend = ("onednn-packed" if packed else "torch") + "".join(f" + {t}" for t in sorted(tiles)) + (
            f" + {config.quantization}" if config.quantization else "")
        if profile:
            self.num_blocks = smallest_across_ranks(self._blocks_for_gpu(config, cfg, bytes_per_block, at_start), self.device)
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
    def _blocks_for_memory(config: EngineConfig, cfg: ModelConfig, bytes_per_block: int, kv_bytes: int | None = None) -> int:
        """Blocks that fit in kv_bytes (default: kv_cache_gib, 2 GiB when unset), but never more
        than max_num_seqs full-length sequences can use: a small model would otherwise allocate
        (and zero) gigabytes it cannot fill."""
        if kv_bytes is None:
            kv_bytes = int((config.kv_cache_gib or 2.0) * 2**30)
        usable = config.max_num_seqs * -(-context_len(config, cfg) // config.block_size)
        return max(1, min(kv_bytes // bytes_per_block, usable))

    @torch.inference_mode()
    def _blocks_for_gpu(self, config: EngineConfig, cfg: ModelConfig, bytes_per_block: int, at_start: GpuMemory) -> int:
        """Runs the largest step the scheduler can send (max_num_batched_tokens as one prefill,
        logits for max_num_seqs rows) with no KV pool yet, and gives the pool what it leaves."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        tokens = config.max_num_batched_tokens
        step = StepInputs(input_ids=[0] * tokens, positions=list(range(tokens)), slots=[-1] * tokens,  # writes nothing
                          prefill_q=[tokens], prefill_ctx=[tokens], prefill_tables=[[0] * -(-tokens // self.block_size)])
        self.kv_cache = torch.zeros((2, cfg.num_hidden_layers, 1, self.block_size, self.shard.kv_heads(cfg), cfg.head_dim),
                                    dtype=self.dtype, device=self.device)
        hidden = self.execute(step)
        self.model.compute_logits(hidden[-1:].expand(min(config.max_num_seqs, tokens), -1).contiguous())
        torch.cuda.synchronize(self.device)
        del self.kv_cache, hidden
        now = gpu_memory(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - at_start.allocated  # this engine's weights + activations
        non_torch = max(0, (at_start.free - now.free) - (now.reserved - at_start.reserved))  # CUDA context, cuBLAS
        kv_bytes = kv_bytes_for_gpu(now.total, at_start.free, config.gpu_memory_utilization, peak, non_torch)
        return self._blocks_for_memory(config, cfg, bytes_per_block, kv_bytes)

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
        """The step's ids, positions and metadata, built as one host buffer and moved to the
        device in one (pinned, non-blocking) copy; every tensor is a view of it."""
        width = max((len(t) for t in step.decode_tables), default=0)
        prefill_width = max((len(t) for t in step.prefill_tables), default=0)
        parts = [
            step.input_ids, step.positions, step.slots, step.decode_lens,
            [b for t in step.decode_tables for b in (*t, *[0] * (width - len(t)))],
            [0, *itertools.accumulate(step.prefill_q)], [0, *itertools.accumulate(step.prefill_ctx)],
            [b for t in step.prefill_tables for b in (*t, *[0] * (prefill_width - len(t)))],
        ]
        flat = to_device(torch.tensor([v for part in parts for v in part], dtype=torch.long), self.device)
        ids, positions, slots, decode_lens, decode_tables, cu_q, cu_k, prefill_tables = flat.split([len(p) for p in parts])
        prefill = None
        if step.prefill_q:
            prefill = PrefillMetadata(
                cu_seqlens_q=cu_q.int(), cu_seqlens_k=cu_k.int(),
                block_tables=prefill_tables.view(len(step.prefill_q), prefill_width),
                max_seqlen_q=max(step.prefill_q), max_seqlen_k=max(step.prefill_ctx),
                query_lens=step.prefill_q, context_lens=step.prefill_ctx,
            )
        meta = AttentionMetadata(
            slot_mapping=slots, num_decode_tokens=len(step.decode_tables),
            decode_block_tables=decode_tables.view(len(step.decode_tables), width),
            decode_context_lens=decode_lens, prefill=prefill,
        )
        return ids, positions, meta

    def prepare_inputs(self, seqs: list[Sequence], counts: list[int]):
        """The forward's tensors for a batch (ids, positions, metadata) and the sample rows."""
        step, sample_rows = self.plan(seqs, counts)
        return *self.tensors(step), sample_rows
