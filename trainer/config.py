"""The training run as one dataclass. Defaults are the s1 paper's recipe (MISSION.md, "Training");
a YAML/TOML/JSON file and then command-line flags override them, field by field."""

import json
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from server.engine.think import THINK_TEMPLATES
from server.errors import InvalidConfigError

OVERLONG_POLICIES = ("truncate", "drop")


@dataclass
class TrainConfig:
    model: str = ""  # Hugging Face model directory to start from; "default": the embedded SmolLM2-135M-Instruct
    dataset: str = ""  # s1K-schema data: a save_to_disk directory, a .parquet or a .jsonl file
    output_dir: str = ""  # where the trained Hugging Face directory is written
    think_format: str = "s1"  # a server ThinkTemplate name: "s1" or "r1"
    system_prompt: str = ""  # empty: whatever the chat template puts there (Qwen's default for s1)
    trajectory_field: str = ""  # empty: thinking_trajectories (s1K) or deepseek_thinking_trajectory (s1K-1.1)
    attempt_field: str = ""  # empty: attempt (s1K) or deepseek_attempt (s1K-1.1)
    learning_rate: float = 1e-5
    num_epochs: float = 5.0
    max_steps: int | None = None  # stop after this many optimizer steps (a short run); None: the epochs decide
    global_batch_size: int = 16  # per_device_batch_size x gradient accumulation x world size
    per_device_batch_size: int = 1
    warmup_ratio: float = 0.05  # linear warm-up, then cosine to 0
    weight_decay: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    bf16: bool | None = None  # None: on when the GPU supports it
    gradient_checkpointing: bool = True
    max_seq_length: int = 32768
    overlong: str = "truncate"  # samples longer than max_seq_length: "truncate" or "drop"
    seed: int = 42
    logging_steps: int = 1
    dataset_num_proc: int | None = None

    def __post_init__(self) -> None:
        for name in ("model", "dataset", "output_dir"):
            if not getattr(self, name):
                raise InvalidConfigError(f"{name}: required (set it in the config file or with --{name.replace('_', '-')})")
        if self.think_format not in THINK_TEMPLATES:
            raise InvalidConfigError(f"think_format: {self.think_format!r} is not one of {sorted(THINK_TEMPLATES)}")
        if self.overlong not in OVERLONG_POLICIES:
            raise InvalidConfigError(f"overlong: {self.overlong!r} is not one of {OVERLONG_POLICIES}")
        for name in ("global_batch_size", "per_device_batch_size", "max_seq_length", "logging_steps"):
            if getattr(self, name) < 1:
                raise InvalidConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if not self.learning_rate > 0 or not self.num_epochs > 0:
            raise InvalidConfigError("learning_rate and num_epochs: must be positive")
        if self.max_steps is not None and self.max_steps < 1:
            raise InvalidConfigError(f"max_steps: must be at least 1, got {self.max_steps}")
        if not 0 <= self.warmup_ratio < 1:
            raise InvalidConfigError(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")

    def gradient_accumulation(self, world_size: int) -> int:
        """Steps to accumulate so that one optimizer step sees `global_batch_size` samples."""
        per_step = self.per_device_batch_size * world_size
        if self.global_batch_size % per_step:
            raise InvalidConfigError(
                f"global_batch_size: {self.global_batch_size} is not a multiple of per_device_batch_size x world size"
                f" = {self.per_device_batch_size} x {world_size}"
            )
        return self.global_batch_size // per_step

    def to_dict(self) -> dict:
        return asdict(self)


def load_config_file(path: str | Path) -> dict:
    """A config file's fields as a dict (YAML, TOML or JSON by extension); unknown keys are errors."""
    path = Path(path)
    if not path.is_file():
        raise InvalidConfigError(f"config: {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise InvalidConfigError(f"config: {path} cannot be parsed: {exc}") from exc
    data = data or {}
    if not isinstance(data, dict):
        raise InvalidConfigError(f"config: {path} must hold a mapping of fields")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidConfigError(f"config: {path} has unknown fields {unknown}")
    return data
