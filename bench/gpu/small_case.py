"""A small engine run for compute-sanitizer (memcheck, racecheck): a tiny random Llama on CUDA,
mixed prefill and decode, a few steps."""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's tests package

from server.engine import LLM, SamplingParams  # noqa: E402
from tests.conftest import build_tiny_model, random_prompts  # noqa: E402

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(Path(tmp) / "tiny", "llama")
        llm = LLM(model, device="cuda", num_kv_blocks=64, block_size=16)
        outs = llm.generate(random_prompts(4, 200, seed=1, max_len=40), SamplingParams(temperature=0, max_tokens=8))
        print([len(o.token_ids) for o in outs])
