"""Final answers out of reply text, and majority votes over them: one definition for the
evaluator's graders (clients/eval/graders.py), the server's `vote` over `n` samples and the
engine's adaptive-thinking probes.

Methods: "math" (the last \\boxed{}, else what follows the last "Answer:", else the last line;
answers are the same when math-verify finds them equivalent, e.g. 1/2 and 0.5), "multiple_choice"
(the chosen letter A-J), "exact" (the extracted answer as written) and "normalized" (case,
punctuation, articles and whitespace ignored; numbers compared as numbers).
"""

import logging
import re
from dataclasses import dataclass

METHODS = ("math", "multiple_choice", "exact", "normalized")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


_ANSWER_LINE = re.compile(r"(?:final answer|answer)\s*(?:is)?\s*[:：]\s*(.+)", re.IGNORECASE)
_LABEL_ONLY = re.compile(r"^(?:final answer|answer)\s*(?:is)?\s*[:：]?$", re.IGNORECASE)


def extract_final_answer(text: str) -> str:
    """The last \\boxed{} value, else what follows the last "Answer:", else the last line ("" when
    that line is only an answer label: a forced "Final Answer:" the model left empty)."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    matches = _ANSWER_LINE.findall(text)
    if matches:
        return matches[-1].strip().rstrip(".")
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines and not _LABEL_ONLY.match(lines[-1]) else ""


_STANDALONE = r"(?<![A-Za-z])\(?([A-J])\)?(?![A-Za-z])"
_LETTER_PATTERNS = [
    re.compile(r"answer\s*(?:is|:|：)\s*\(?([A-J])\)?(?![A-Za-z])", re.IGNORECASE),  # "Answer: C", "answer is (C)"
    re.compile(r"\(([A-J])\)"),  # "(C)"
]


def chosen_letter(reply: str) -> str | None:
    """The chosen option, by precedence: \\boxed{C}; "answer is C" / "Answer: (C)"; the last "(C)";
    the last standalone capital A-J of the last line (so "I think..." does not read as option I)."""
    boxed = last_boxed(reply)
    choice = None
    if boxed is not None:
        found = re.findall(_STANDALONE, boxed)
        choice = found[-1] if found else None
    for pattern in _LETTER_PATTERNS:
        if choice is None:
            found = pattern.findall(reply)
            choice = found[-1].upper() if found else None
    if choice is None:
        lines = [line for line in reply.strip().splitlines() if line.strip()]
        found = re.findall(_STANDALONE, lines[-1]) if lines else []
        choice = found[-1] if found else None
    return choice


def normalize(text: str) -> str:
    text = text.lower().strip()
    text = re.sub(r"[^\w\s.-]", "", text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split()).rstrip(".")


def normalized_equal(got: str, want: str) -> bool:
    got, want = normalize(got), normalize(want)
    try:
        return float(got.replace(",", "")) == float(want.replace(",", ""))
    except ValueError:
        return got == want


def extract(text: str, method: str) -> str:
    """The reply's answer for `method` ("" when it has none)."""
    if method == "multiple_choice":
        return chosen_letter(text) or ""
    answer = extract_final_answer(text)
    return normalize(answer) if method == "normalized" else answer


class _NoTimeoutWarning(logging.Filter):
    """math-verify warns on every call made without its timeout; we bound the input instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_NoTimeoutWarning())

MAX_MATH_CHARS = 256  # longer "answers" are compared as text: parsing them could take unbounded time


def math_equal(a: str, b: str) -> bool:
    """math-verify equivalence. Off the main thread (the server votes in a worker thread) its
    signal-based timeout cannot work, so it runs without one on inputs bounded in length."""
    import threading

    from math_verify import parse, verify

    if a.strip() == b.strip():
        return True
    if max(len(a), len(b)) > MAX_MATH_CHARS:
        return False
    timeout = {} if threading.current_thread() is threading.main_thread() else {"parsing_timeout": None}
    first = parse(f"${a}$", **timeout) or parse(a, **timeout)
    second = parse(f"${b}$", **timeout) or parse(b, **timeout)
    verify_timeout = {} if not timeout else {"timeout_seconds": None}
    return bool(first and second and verify(first, second, **verify_timeout))


def same(a: str, b: str, method: str) -> bool:
    if not a or not b:
        return False
    if method == "math":
        return math_equal(a, b)
    if method == "normalized":
        return normalized_equal(a, b)
    return a == b


@dataclass
class Vote:
    answer: str  # the majority answer ("" when no sample had one)
    count: int  # samples that gave it
    answers: list[str]  # each sample's extracted answer, by sample index
    method: str


def majority(texts: list[str], method: str) -> Vote:
    """The answer most samples agree on (as `same` groups them; an empty answer never counts).
    Ties go to the answer that appeared first, i.e. in the lowest-numbered sample: a documented,
    seed-reproducible rule (vLLM has no vote; self-consistency papers break ties arbitrarily)."""
    answers = [extract(t, method) for t in texts]
    groups: list[tuple[str, int]] = []  # (representative, count), in order of first appearance
    for answer in answers:
        if not answer:
            continue
        for k, (representative, count) in enumerate(groups):
            if same(representative, answer, method):
                groups[k] = (representative, count + 1)
                break
        else:
            groups.append((answer, 1))
    if not groups:
        return Vote("", 0, answers, method)
    best = max(range(len(groups)), key=lambda k: (groups[k][1], -k))
    return Vote(groups[best][0], groups[best][1], answers, method)
