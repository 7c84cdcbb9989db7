"""Evaluation tasks: files of questions with reference answers, plus a grader name.

A task is a JSONL file, a Parquet file or a `datasets.save_to_disk` directory whose records have
`question` and `answer` (and `id`, optional; `tests` for code tasks; `grader`, optional, else the
one given on the command line). The bundled task `arith` is generated here: two-step arithmetic
with exact integer answers, enough to watch the pipeline work on the default model.
"""

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import TaskError
from .graders import get_grader


@dataclass
class Question:
    id: str
    question: str
    answer: str
    grader: str
    record: dict = field(default_factory=dict)  # the full record (graders may read e.g. `tests`)


def arith_task(n: int = 20, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        a, b, c = rng.randint(2, 30), rng.randint(2, 30), rng.randint(1, 50)
        records.append({"id": f"arith-{i}", "question": f"Compute {a} * {b} + {c}. Give the final answer as \\boxed{{N}}.",
                        "answer": str(a * b + c)})
    return records


def _read_records(path: Path) -> list[dict]:
    if path.is_dir() or path.suffix == ".parquet":
        try:
            import datasets
        except ImportError:
            raise TaskError(f"{path}: reading Parquet or save_to_disk tasks needs the `datasets` package") from None
        ds = datasets.load_from_disk(str(path)) if path.is_dir() else datasets.load_dataset("parquet", data_files=str(path))["train"]
        return [dict(r) for r in ds]
    records = []
    with path.open() as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise TaskError(f"{path}:{line_no}: not JSON ({exc.msg})") from None
    return records


def load_task(task: str, grader: str | None = None, limit: int | None = None) -> list[Question]:
    """`task`: a path, or `arith` for the bundled demo task."""
    if task == "arith":
        records, default_grader = arith_task(), "math"
    else:
        path = Path(task)
        if not path.exists():
            raise TaskError(f"task {task!r}: no such file or directory (or bundled task: arith)")
        records, default_grader = _read_records(path), None
    questions = []
    for i, r in enumerate(records[:limit] if limit else records):
        for key in ("question", "answer"):
            if key not in r or r[key] is None:
                raise TaskError(f"task {task!r}: record {i} has no {key!r} field")
        name = grader or r.get("grader") or default_grader
        if name is None:
            raise TaskError(f"task {task!r}: no grader; pass --grader ({'math'}, multiple_choice, exact, normalized, code)")
        get_grader(name)  # an unknown name fails here, before anything is sent
        questions.append(Question(str(r.get("id", i)), str(r["question"]), str(r["answer"]), name, r))
    if not questions:
        raise TaskError(f"task {task!r} has no questions")
    return questions
