"""The decoder on paged attention computes transformers' logits; the loader refuses what it can't place."""

import json
import shutil

import pytest
import torch

from server.engine.block_manager import BlockManager
from server.engine.model_runner import ModelRunner
from server.engine.config import EngineConfig
from server.engine.params import SamplingParams
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence
from server.errors import UnsupportedModelError
from server.models import ModelConfig, load_model
from tests.conftest import build_tiny_model


def hf_logits(model_dir, token_ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0]


def paged_logits(model_dir, tokens: list[int], chunk: int, block_size: int = 4) -> torch.Tensor:
    """Logits at every position, feeding `tokens` through the paged path `chunk` tokens per step."""
    num_blocks = -(-len(tokens) // block_size)
    config = EngineConfig(block_size=block_size, num_kv_blocks=num_blocks, max_num_batched_tokens=chunk, dtype="float32")
    runner = ModelRunner(str(model_dir), config, ModelConfig.from_model_dir(model_dir))
    sched = Scheduler(BlockManager(num_blocks, block_size), 1, chunk)
    seq = Sequence("x", tokens, SamplingParams(), seed=0)
    sched.add(seq)
    logits = []
    with torch.inference_mode():
        while seq.num_computed_tokens < len(tokens):
            batch = sched.schedule()
            ids, pos, meta, _ = runner.prepare_inputs(batch.seqs, batch.num_new_tokens)
            logits.append(runner.model.compute_logits(runner.model(ids, pos, runner.kv_cache, meta)))
            seq.num_computed_tokens += batch.num_new_tokens[0]
    return torch.cat(logits)


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_prefill_chunks_and_decodes_give_transformers_logits(model_dir, chunk):
    """Feed 50 tokens through the paged path `chunk` at a time; logits at every position match."""
    vocab = ModelConfig.from_model_dir(model_dir).vocab_size
    tokens = torch.randint(0, vocab, (50,), generator=torch.Generator().manual_seed(chunk)).tolist()
    expected = hf_logits(model_dir, tokens)
    torch.testing.assert_close(paged_logits(model_dir, tokens, chunk), expected, rtol=1e-4, atol=1e-4)


def test_sharded_checkpoints_load_like_single_files(tmp_path, llama_dir):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(llama_dir).save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    single = load_model(llama_dir, torch.float32, torch.device("cpu")).state_dict()
    sharded = load_model(tmp_path, torch.float32, torch.device("cpu")).state_dict()
    assert single.keys() == sharded.keys()
    assert all(torch.equal(single[k], sharded[k]) for k in single)


def test_a_missing_tensor_is_an_error_not_a_random_weight(tmp_path, llama_dir):
    from safetensors.torch import load_file, save_file

    shutil.copy(llama_dir / "config.json", tmp_path / "config.json")
    weights = load_file(llama_dir / "model.safetensors")
    del weights["model.layers.1.self_attn.k_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(UnsupportedModelError, match="lacks 1 tensors"):
        load_model(tmp_path, torch.float32, torch.device("cpu"))


def test_unsupported_architectures_are_refused(tmp_path, llama_dir):
    raw = json.loads((llama_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(raw | {"model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        ModelConfig.from_model_dir(tmp_path)
    rope = raw | {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}
    (tmp_path / "config.json").write_text(json.dumps(rope))
    with pytest.raises(UnsupportedModelError, match="yarn"):
        ModelConfig.from_model_dir(tmp_path)


def test_llama_attention_bias_is_loaded(tmp_path):
    model_dir = build_tiny_model(tmp_path, "llama", attention_bias=True, mlp_bias=True)
    cfg = ModelConfig.from_model_dir(model_dir)
    assert cfg.qkv_bias and cfg.o_bias and cfg.mlp_bias
    tokens = list(range(1, 30))
    torch.testing.assert_close(paged_logits(model_dir, tokens, chunk=64), hf_logits(model_dir, tokens), rtol=1e-4, atol=1e-4)
