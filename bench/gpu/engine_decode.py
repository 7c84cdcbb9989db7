"""The engine's decode tokens/s on a GPU at batch 1 and 64, on a random-weight Qwen2.5-7B-shaped
checkpoint written to a temp dir (bf16), greedy, EOS ignored.

    python bench/gpu/engine_decode.py --out results.json
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def random_7b(path: Path) -> Path:
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, Qwen2Config

    from server.cli import resolve_model_dir

    config = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, torch_dtype="bfloat16")
    config.save_pretrained(path)
    AutoTokenizer.from_pretrained(resolve_model_dir(None)).save_pretrained(path)  # ids only
    h, i, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * 128
    tensors = {"model.embed_tokens.weight": (config.vocab_size, h), "lm_head.weight": (config.vocab_size, h),
               "model.norm.weight": (h,)}
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        tensors.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
                        p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
                        p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
                        p + "self_attn.o_proj.weight": (h, h), p + "mlp.gate_proj.weight": (i, h),
                        p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
                        p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
    weights = {name: (torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02).cpu() for name, shape in tensors.items()}
    save_file(weights, str(path / "model.safetensors"))
    return path


def rate(llm, batch: int, new_tokens: int) -> dict:
    from server.engine import SamplingParams

    prompts = [[100 + (7 * b + j) % 5000 for j in range(128)] for b in range(batch)]
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"batch": batch, "new_tokens": new_tokens, "seconds": elapsed, "tokens_per_s": batch * new_tokens / elapsed,
            "ms_per_step": 1000 * elapsed / new_tokens}


def main() -> None:
    from server.engine import LLM

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        llm = LLM(random_7b(Path(tmp)), device="cuda", dtype="bfloat16", kv_cache_gib=16, max_num_seqs=64)
        result = {"device": torch.cuda.get_device_name(), "rows": [rate(llm, 1, 128), rate(llm, 64, 128)]}
    print(json.dumps(result, indent=2))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
