"""Where benchmark results go: one JSON file per run under bench/results/, stamped and named."""

import json
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).parent / "results"


def machine() -> dict:
    return {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def result_path(kind: str, out_dir: str | Path = RESULTS_DIR, tag: str = "cpu") -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{kind}-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}-{tag}.json"


def write(path: Path, result: dict) -> Path:
    """`result` plus when and where it ran. Long benchmarks call this after every phase, so a
    baseline that has to be killed does not take the finished phases with it."""
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    path.write_text(json.dumps({"when": stamp, "machine": machine(), **result}, indent=2) + "\n")
    return path


def save(kind: str, result: dict, out_dir: str | Path = RESULTS_DIR, tag: str = "cpu") -> Path:
    return write(result_path(kind, out_dir, tag), result)
