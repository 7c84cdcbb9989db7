"""Where benchmark results go: one JSON file per run under bench/results/, stamped and named."""

import json
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).parent / "results"


def cpu_model() -> str:
    """The CPU's model name (these machines are not all alike: AVX-512 + AMX Xeons, AVX2 EPYCs)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def machine() -> dict:
    import server._C  # noqa: F401  (registers torch.ops.s1serve)

    bf16 = " + amx" if torch.ops.s1serve.cpu_has_amx_bf16() else " + avx512_bf16" if torch.ops.s1serve.cpu_has_dpbf16() else ""
    return {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cpu_model": cpu_model(), "isa": torch.ops.s1serve.cpu_isa() + bf16,
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
