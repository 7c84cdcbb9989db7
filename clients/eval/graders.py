"""Graders: does a reply's final answer match the reference? One function per kind of task.

Each takes (reply text, reference answer, question record) and returns True/False. Replies are
the answer phase when the request had a think phase (the thinking may try many candidates).
"""

import re
import subprocess
import sys
import tempfile
from collections.abc import Callable

from server.answers import chosen_letter, extract_final_answer, last_boxed, normalized_equal  # noqa: F401 (re-exported)

from ..errors import TaskError

Grader = Callable[[str, str, dict], bool]


def math_grader(reply: str, reference: str, record: dict) -> bool:
    """Symbolic equivalence with math-verify (fractions, decimals, LaTeX, sets, intervals)."""
    from math_verify import parse, verify

    candidate = extract_final_answer(reply)
    if not candidate:
        return False
    gold = parse(f"${reference}$") or parse(reference)
    answer = parse(f"${candidate}$") or parse(candidate)
    return bool(gold and answer and verify(gold, answer))


def multiple_choice_grader(reply: str, reference: str, record: dict) -> bool:
    """The chosen letter (server.answers.chosen_letter) against the reference's."""
    choice = chosen_letter(reply)
    return choice is not None and choice == reference.strip().strip("()").upper()


def exact_grader(reply: str, reference: str, record: dict) -> bool:
    return extract_final_answer(reply) == reference.strip()


def normalized_grader(reply: str, reference: str, record: dict) -> bool:
    """Case, punctuation, articles and whitespace ignored (SQuAD-style), numbers compared as numbers."""
    return normalized_equal(extract_final_answer(reply), reference)


# Prepended to graded code: sockets refuse to connect or resolve. A guard against tests that
# reach out by accident, not a security sandbox (run untrusted code in a container for that).
_NO_NETWORK = """import socket as _socket


def _no_network(*args, **kwargs):
    raise OSError("network access is disabled while grading")


_socket.socket.connect = _socket.socket.connect_ex = _no_network
_socket.create_connection = _socket.getaddrinfo = _no_network
del _socket, _no_network

"""

_CODE_BLOCK = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)


def code_grader(reply: str, reference: str, record: dict, timeout_s: float = 10.0) -> bool:
    """Runs the reply's last ```python block followed by the record's `tests` (asserts) in a fresh,
    isolated interpreter with sockets disabled; a loop, crash or timeout fails instead of hanging."""
    blocks = _CODE_BLOCK.findall(reply)
    code = blocks[-1] if blocks else reply
    tests = record.get("tests") or reference
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/candidate.py"
        with open(path, "w") as f:
            f.write(_NO_NETWORK + code + "\n\n" + tests + "\n")
        try:
            result = subprocess.run([sys.executable, "-I", path], cwd=tmp, capture_output=True, timeout=timeout_s,
                                    env={"PATH": "/usr/bin:/bin"})
        except subprocess.TimeoutExpired:
            return False
    return result.returncode == 0


def reasoning_gym_grader(reply: str, reference: str, record: dict) -> bool:
    """A reasoning-gym task's own `score_answer` on the reply's final answer. The record names
    the generator (`task`) and carries its entry `metadata` (a dict or its JSON), as
    `dataset_builder.reasoning_gym_source.rows` writes them."""
    import json

    try:
        import reasoning_gym
    except ImportError:
        raise TaskError("the reasoning_gym grader needs the `reasoning-gym` package") from None
    if not record.get("task"):
        raise TaskError("the reasoning_gym grader needs a `task` field (the generator's name) in every record")
    metadata = record.get("metadata") or {}
    metadata = json.loads(metadata) if isinstance(metadata, str) else metadata
    entry = {"question": record.get("question", ""), "answer": reference, "metadata": metadata}
    return reasoning_gym.get_score_answer_fn(record["task"])(answer=extract_final_answer(reply), entry=entry) >= 1.0


GRADERS: dict[str, Grader] = {
    "math": math_grader,
    "multiple_choice": multiple_choice_grader,
    "exact": exact_grader,
    "normalized": normalized_grader,
    "code": code_grader,
    "reasoning_gym": reasoning_gym_grader,
}


def get_grader(name: str) -> Grader:
    if name not in GRADERS:
        raise TaskError(f"unknown grader {name!r}; choose one of {', '.join(GRADERS)}")
    return GRADERS[name]
