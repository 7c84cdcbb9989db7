"""A small engine run for compute-sanitizer (memcheck, racecheck): a tiny random Llama on CUDA,
mixed prefill and decode, a few steps; then the paged prefill kernel in bf16 on chunks after
cached context (the engine's tiny model runs fp32, which that kernel leaves to SDPA)."""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's tests package

from server.engine import LLM, SamplingParams  # noqa: E402
from tests.conftest import build_tiny_model, random_prompts  # noqa: E402
from tests.csrc.test_ops import random_prefill_batch  # noqa: E402

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(Path(tmp) / "tiny", "llama")
        llm = LLM(model, device="cuda", num_kv_blocks=64, block_size=16)
        outs = llm.generate(random_prompts(4, 200, seed=1, max_len=40), SamplingParams(temperature=0, max_tokens=8))
        print([len(o.token_ids) for o in outs])
    import torch

    batch = random_prefill_batch([200, 70, 9], [130, 70, 1], 8, 2, 64, 16, seed=1, dtype=torch.bfloat16)
    query, _, _, k_cache, v_cache, meta = (t.cuda() if isinstance(t, torch.Tensor) else t for t in batch)
    out = torch.empty_like(query)
    torch.ops.s1serve.paged_attention_prefill(out, query, k_cache, v_cache, meta.block_tables.cuda(),
                                              meta.cu_seqlens_q.cuda(), meta.cu_seqlens_k.cuda(), 0.125)
    torch.cuda.synchronize()
    print("paged prefill finite:", bool(torch.isfinite(out).all()))
