"""Stage 4: every solver answers every (untrusted) question; a grader checks each answer against
the reference. A question any solver gets right is too easy and is dropped. Questions with no
reference answer cannot be graded and are kept (counted as `ungraded`)."""

from collections.abc import Callable
from dataclasses import dataclass, field

from clients.eval.graders import extract_final_answer, last_boxed, math_grader

from .backends import Messages, Reply
from .cache import ResultCache, content_key

SOLVE_PROMPT = "{question}\n\nPut your final answer within \\boxed{{}}."
JUDGE_PROMPT = (
    "You are grading an answer to a problem.\n\nProblem:\n{question}\n\nReference answer:\n{reference}\n\n"
    "Attempt:\n{attempt}\n\nDoes the attempt reach the same final answer as the reference? Reply YES or NO."
)

# A grader: (question, attempt, reference) -> correct?
Grader = Callable[[str, str, str], bool]


def reference_answer(row: dict) -> str:
    """The row's answer, else the last \\boxed{} of its solution, else "" (ungradable)."""
    if (row.get("answer") or "").strip():
        return row["answer"].strip()
    return (last_boxed(row.get("solution") or "") or "").strip()


def math_verify_grader(question: str, attempt: str, reference: str) -> bool:
    try:
        return math_grader(attempt, reference, {})
    except Exception:  # math-verify raises on some unparsable LaTeX: an unparsable answer is wrong
        return False


@dataclass
class LLMJudge:
    """The paper's grader: a model compares attempt and reference (it used Claude 3.5 Sonnet)."""

    backend: object

    def __call__(self, question: str, attempt: str, reference: str) -> bool:
        [reply] = self.backend.chat([[{"role": "user", "content": JUDGE_PROMPT.format(
            question=question, reference=reference, attempt=extract_final_answer(attempt) or attempt)}]])
        return reply.content.strip().upper().startswith("YES")


@dataclass
class DifficultyFilter:
    """Dataset -> Dataset of the questions no solver answered correctly."""

    solvers: list
    grader: Grader = math_verify_grader
    cache: ResultCache = field(default_factory=lambda: ResultCache(None))
    batch_size: int = 64
    solved: dict[str, int] = field(default_factory=dict)  # solver name -> questions it solved
    ungraded: int = 0
    failed_requests: int = 0

    def _answers(self, solver, questions: list[str]) -> list[Reply]:
        keys = [content_key("solve", solver.name, q) for q in questions]
        todo = [i for i, k in enumerate(keys) if self.cache.get(k) is None]
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            conversations: list[Messages] = [[{"role": "user", "content": SOLVE_PROMPT.format(question=questions[i])}] for i in chunk]
            replies = solver.chat(conversations, progress=f"difficulty, {solver.name}: {start + len(chunk)}/{len(todo)}")
            self.cache.put_many({keys[i]: dict(reply.__dict__) for i, reply in zip(chunk, replies) if not reply.error})
            for i, reply in zip(chunk, replies):
                if reply.error:
                    self.cache.entries[keys[i]] = dict(reply.__dict__)  # this run only; retried next run
        return [Reply(**self.cache.get(k)) for k in keys]

    def __call__(self, data):
        references = [reference_answer(row) for row in data]
        candidates = [i for i, row in enumerate(data) if not row["trusted"] and references[i]]
        self.ungraded = sum(1 for i, row in enumerate(data) if not row["trusted"] and not references[i])
        questions = data["question"]
        solved = set()
        for solver in self.solvers:
            open_items = [i for i in candidates if i not in solved]
            replies = self._answers(solver, [questions[i] for i in open_items])
            right = {i for i, reply in zip(open_items, replies)
                     if not reply.error and self.grader(questions[i], reply.content, references[i])}
            self.failed_requests += sum(1 for reply in replies if reply.error)
            self.solved[solver.name] = len(right)
            solved |= right
        return data.select([i for i in range(len(data)) if i not in solved])
