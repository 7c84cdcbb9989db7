"""An s1K-schema dataset on disk and a tiny Qwen2 to train on."""

import random
from pathlib import Path

import pytest

S1K_COLUMNS = ["question", "solution", "cot_type", "source_type", "metadata", "cot", "thinking_trajectories", "attempt"]


def s1k_rows(n: int, seed: int = 0) -> list[dict]:
    """Short arithmetic samples in the s1K schema (trajectories as a one-element list, as s1K has them)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        rows.append({
            "question": f"What is {a}+{b}?",
            "solution": str(a + b),
            "cot_type": "math",
            "source_type": "synthetic/arith",
            "metadata": "{}",
            "cot": None,
            "thinking_trajectories": [f"Let me add {a} and {b}. {a}+{b} = {a + b}. The answer is {a + b}."],
            "attempt": f"The answer is {a + b}.",
        })
    return rows


def write_s1k(path: Path, rows: list[dict]) -> Path:
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.fixture(scope="session")
def base_model(qwen2_dir) -> Path:
    """The session's tiny Qwen2 (tests/conftest.py); training only reads it."""
    return qwen2_dir


@pytest.fixture(scope="session")
def s1k_dir(tmp_path_factory) -> Path:
    return write_s1k(tmp_path_factory.mktemp("s1k") / "data", s1k_rows(32))
