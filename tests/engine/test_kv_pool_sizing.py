"""How big the KV pool is: explicit blocks, kv_cache_gib, and on one GPU what a profiling forward
leaves of gpu_memory_utilization (the arithmetic here; the profile itself in the gpu tests)."""

import pytest
import torch

from server.engine import EngineConfig
from server.engine.model_runner import ModelRunner, kv_bytes_for_gpu
from server.errors import InvalidConfigError
from server.models import ModelConfig

GIB = 2**30


def test_the_pool_gets_what_the_weights_and_activations_leave_of_the_utilization():
    assert kv_bytes_for_gpu(total=80 * GIB, free_at_start=79 * GIB, utilization=0.9, peak_torch=20 * GIB,
                            non_torch=GIB) == int(80 * GIB * 0.9) - 21 * GIB


@pytest.mark.parametrize("free,peak,message", [
    (60 * GIB, 20 * GIB, "only 60.0 GiB was free"),  # another process holds memory this share needs
    (79 * GIB, 75 * GIB, "leaves nothing for the KV cache"),  # the weights and activations alone exceed it
])
def test_a_utilization_that_cannot_hold_a_pool_is_refused_naming_the_flag(free, peak, message):
    with pytest.raises(InvalidConfigError, match=f"gpu_memory_utilization: .*{message}"):
        kv_bytes_for_gpu(total=80 * GIB, free_at_start=free, utilization=0.9, peak_torch=peak, non_torch=0)


@pytest.mark.parametrize("value", [0, 1.5, -0.1])
def test_gpu_memory_utilization_outside_0_1_is_refused(value):
    with pytest.raises(InvalidConfigError, match="gpu_memory_utilization"):
        EngineConfig(gpu_memory_utilization=value)


def test_on_the_cpu_an_unset_kv_cache_gib_means_2_gib_capped_by_what_sequences_can_use(llama_dir):
    cfg = ModelConfig.from_model_dir(llama_dir)
    per_block = 2 * cfg.num_hidden_layers * 16 * cfg.num_key_value_heads * cfg.head_dim * 4
    wide = EngineConfig(max_num_seqs=100000)  # so the 2 GiB, not the sequences, is the limit
    assert ModelRunner._blocks_for_memory(wide, cfg, per_block) == 2 * GIB // per_block
    assert ModelRunner._blocks_for_memory(EngineConfig(kv_cache_gib=0.5, max_num_seqs=100000), cfg, per_block) == GIB // 2 // per_block
    narrow = EngineConfig(max_num_seqs=2, max_model_len=64)
    assert ModelRunner._blocks_for_memory(narrow, cfg, per_block) == 2 * 4  # two sequences of 64 tokens


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_one_gpu_the_pool_is_sized_from_a_profiling_forward(llama_dir, make_llm):
    total = torch.cuda.mem_get_info()[1]
    small = make_llm(llama_dir, device="cuda", gpu_memory_utilization=0.02, max_num_seqs=100000)
    large = make_llm(llama_dir, device="cuda", gpu_memory_utilization=0.04, max_num_seqs=100000)
    small_blocks, large_blocks = small.engine.runner.num_blocks, large.engine.runner.num_blocks
    assert 1 < small_blocks < large_blocks
    per_block = small.engine.runner.kv_cache[:, :, 0].numel() * small.engine.runner.kv_cache.element_size()
    assert (large_blocks - small_blocks) * per_block == pytest.approx(0.02 * total, rel=0.05)  # the extra share all went to KV


def test_auto_dtype_is_bf16_on_a_cpu_with_native_bf16_and_fp32_without(llama_dir, monkeypatch):
    from server.engine import model_runner

    cfg = ModelConfig.from_model_dir(llama_dir)
    cpu = torch.device("cpu")
    native = model_runner.cpu_has_native_bf16()
    assert model_runner.resolve_dtype("auto", cfg, cpu) == (torch.bfloat16 if native else torch.float32)
    monkeypatch.setattr(model_runner, "cpu_has_native_bf16", lambda: False)
    assert model_runner.resolve_dtype("auto", cfg, cpu) == torch.float32
    assert model_runner.resolve_dtype("float32", cfg, cpu) == torch.float32  # fp32 stays selectable
