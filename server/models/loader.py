"""Load a Hugging Face model directory (config.json + *.safetensors, sharded or not) into `CausalLM`.

Only safetensors are read: no pickle, no remote code. Checkpoint tensors are renamed into our
fused q/k/v and gate/up projections; a tensor we cannot place, or a parameter left unfilled, is
an error rather than a silently random weight.
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import UnsupportedModelError
from .config import ModelConfig
from .decoder import CausalLM, RotaryEmbedding
from .parallel import Shard

# checkpoint projection -> (our fused parameter, shard index within it)
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UnsupportedModelError(f"{model_dir} holds no *.safetensors weights (pickle checkpoints are not loaded)")
    return files


def load_model(model_dir: str | Path, dtype: torch.dtype, device: torch.device, shard: Shard = Shard()) -> CausalLM:
    """The model, or with tensor parallelism this rank's slice of it: each tensor is read through
    a safetensors slice, so a rank reads only its own rows or columns, never the whole model."""
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_model_dir(model_dir)
    shard.check(cfg)
    with torch.device("meta"):
        model = CausalLM(cfg, shard)
    model = model.to_empty(device=device).to(dtype)
    model.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings).to(device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight

    params = dict(model.named_parameters())
    filled: set[str] = set()
    tp = shard
    for file in safetensors_files(model_dir):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and cfg.tie_word_embeddings):
                    continue
                target, index = _place(name, cfg)
                if target not in params:
                    raise UnsupportedModelError(f"checkpoint tensor {name!r} has no place in the {cfg.model_type} decoder")
                _copy_into(params[target], target, tp.read(name, f.get_slice(name), cfg), index, tp, cfg)
                filled.add(target if index is None else f"{target}#{index}")

    expected = set()
    for name in params:
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        proj = name.split(".")[-2]
        expected |= {f"{name}#{s}" for s in range(3 if proj == "qkv_proj" else 2)} if proj in ("qkv_proj", "gate_up_proj") else {name}
    missing = sorted(expected - filled)
    if missing:
        raise UnsupportedModelError(f"checkpoint in {model_dir} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    return model.eval()


def _place(name: str, cfg: ModelConfig) -> tuple[str, int | None]:
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] in _FUSED:
        fused, shard = _FUSED[parts[-2]]
        return ".".join(parts[:-2] + [fused, parts[-1]]), shard
    return name, None


def _copy_into(param: torch.Tensor, name: str, tensor: torch.Tensor, index: int | None, tp: Shard,
               cfg: ModelConfig) -> None:
    """`tensor` (this rank's part of a checkpoint tensor) into its place; `index` picks the part
    of a fused projection: q / k / v of qkv_proj, gate / up of gate_up_proj."""
    with torch.no_grad():
        if index is None:
            target = param
        elif ".gate_up_proj." in name:  # gate rows, then up rows
            target = param.narrow(0, index * tp.intermediate(cfg), tp.intermediate(cfg))
        else:  # qkv_proj: q rows, then k rows, then v rows
            q_size = tp.heads(cfg) * cfg.head_dim
            kv_size = tp.kv_heads(cfg) * cfg.head_dim
            offset, size = [(0, q_size), (q_size, kv_size), (q_size + kv_size, kv_size)][index]
            target = param.narrow(0, offset, size)
        if target.shape != tensor.shape:
            raise UnsupportedModelError(f"shape mismatch: checkpoint {tuple(tensor.shape)} vs model {tuple(target.shape)}")
        target.copy_(tensor)
