"""The engine's greedy output equals transformers' token for token, under every batching regime."""

import pytest

from server.engine import SamplingParams
from tests.conftest import hf_greedy, random_prompts

MAX_NEW = 24
NUM_PROMPTS = 16

ENGINE_CONFIGS = {
    "default": dict(),
    "block_size_1": dict(block_size=1),
    "block_size_32": dict(block_size=32),
    "chunked_prefill": dict(max_num_batched_tokens=24),
    # 28 blocks x 8 = 224 tokens for 16 sequences of up to 80 + 24: the scheduler must preempt.
    "tiny_pool_preempts": dict(block_size=8, num_kv_blocks=28),
}


@pytest.fixture(scope="module")
def prompts_and_reference(model_dir):
    from server.models import ModelConfig

    vocab = ModelConfig.from_model_dir(model_dir).vocab_size
    prompts = random_prompts(NUM_PROMPTS, vocab - 20, seed=7)
    return prompts, hf_greedy(model_dir, prompts, MAX_NEW)


@pytest.mark.parametrize("config_name", ENGINE_CONFIGS)
def test_greedy_matches_transformers(model_dir, prompts_and_reference, make_llm, config_name):
    prompts, reference = prompts_and_reference
    llm = make_llm(model_dir, **ENGINE_CONFIGS[config_name])
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW))
    for i, (out, ref) in enumerate(zip(outputs, reference)):
        assert out.token_ids == ref, f"prompt {i} (len {len(prompts[i])}) diverged"
        assert out.finish_reason == ("length" if len(ref) == MAX_NEW and ref[-1] not in llm.engine.eos_token_ids else "stop")
    if config_name == "tiny_pool_preempts":
        assert llm.engine.scheduler.num_preemptions > 0
