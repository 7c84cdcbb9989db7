"""reasoning-gym as a problem source: seeded, offline generators of tasks with verifiable answers.

`rows(task, size, seed, config)` gives records in the pipeline's source schema (question, answer,
metadata with the generator's own entry metadata), which `s1serve eval` can grade with the task's
own `score_answer` (grader `reasoning_gym` in clients/eval/graders.py). Train and evaluation sets are the same generators
with different seeds.
"""

import json

from server.errors import InvalidConfigError


def _gym():
    try:
        import reasoning_gym
    except ImportError:
        raise InvalidConfigError("sources: reasoning_gym sources need the `reasoning-gym` package") from None
    return reasoning_gym


def rows(task: str, size: int, seed: int, config: dict | None = None) -> list[dict]:
    """`size` generated problems of `task` as {question, answer, task, metadata (JSON)} records."""
    gym = _gym()
    try:
        dataset = gym.create_dataset(task, size=size, seed=seed, **(config or {}))
    except (ValueError, TypeError, KeyError) as exc:
        raise InvalidConfigError(f"sources: reasoning_gym task {task!r}: {exc}") from exc
    return [{"question": entry["question"], "answer": str(entry["answer"]), "task": task,
             "metadata": json.dumps(entry["metadata"], default=str)} for entry in dataset]
