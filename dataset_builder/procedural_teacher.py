"""An offline teacher that writes real reasoning traces for reasoning-gym arithmetic tasks
(`chain_sum`, `basic_arithmetic`): the expression is parsed and evaluated one operation at a time,
each intermediate result written down, the last step checked by its inverse, and in a share of the
traces (`slip_rate`) one intermediate result is first written wrong and then corrected after
"Wait" -- the shape of the s1 traces that makes "Wait" worth something to the student.

It is a backend like the engine or an endpoint (`{procedural: arithmetic, slip_rate: 0.3}` in a
pipeline config): the pipeline does not know it is not a model.
"""

import hashlib
import random
import re
from dataclasses import dataclass

from .backends import Messages, Reply

_EXPRESSION = re.compile(r"(?:problem:|Calculate)\s*(.+?)\s*[=.]?\s*$", re.IGNORECASE | re.DOTALL)
_TOKEN = re.compile(r"\d+|[-+*/()]")


class ParseError(ValueError):
    pass


def _tokens(expression: str) -> list[str]:
    compact = expression.replace(" ", "")
    tokens = _TOKEN.findall(compact)
    if "".join(tokens) != compact:
        raise ParseError(f"not an arithmetic expression: {expression!r}")
    return tokens


OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a // b}


class _Evaluator:
    """Recursive descent over + - * / ( ) and unary minus, recording every binary operation."""

    def __init__(self, tokens: list[str]):
        self.tokens, self.i, self.steps = tokens, 0, []  # steps: (left, op, right, result)

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise ParseError("the expression ends early")
        self.i += 1
        return token

    def expression(self) -> int:
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            value = self.record(value, op, self.term())
        return value

    def term(self) -> int:
        value = self.factor()
        while self.peek() in ("*", "/"):
            op = self.take()
            value = self.record(value, op, self.factor())
        return value

    def factor(self) -> int:
        token = self.take()
        if token == "-":
            return -self.factor()
        if token == "(":
            value = self.expression()
            if self.take() != ")":
                raise ParseError("unbalanced parentheses")
            return value
        if not token.isdigit():
            raise ParseError(f"unexpected {token!r}")
        return int(token)

    def record(self, left: int, op: str, right: int) -> int:
        if op == "/" and (right == 0 or left % right):  # exact, so floor division is the quotient
            raise ParseError(f"{left} / {right} is not an exact integer division")
        result = OPERATIONS[op](left, right)
        self.steps.append((left, op, right, result))
        return result


def solve(question: str) -> tuple[int, list[tuple[int, str, int, int]]]:
    """The value of the question's expression and its operations in the order they are done."""
    match = _EXPRESSION.search(question.strip())
    if not match:
        raise ParseError("no arithmetic expression in the question")
    evaluator = _Evaluator(_tokens(match.group(1)))
    value = evaluator.expression()
    if evaluator.peek() is not None:
        raise ParseError(f"unexpected {evaluator.peek()!r}")
    return value, evaluator.steps


INVERSE = {"+": "-", "-": "+", "*": "/", "/": "*"}


def trace(question: str, rng: random.Random, slip_rate: float) -> tuple[str, str]:
    """(thinking, attempt) for one question."""
    value, steps = solve(question)
    lines = ["One operation at a time."]
    slip = rng.randrange(len(steps)) if steps and rng.random() < slip_rate else None
    for k, (left, op, right, result) in enumerate(steps):
        if k == slip:
            wrong = result + rng.choice([-10, -2, -1, 1, 2, 10])
            lines.append(f"{left} {op} {right} = {wrong}.")
            lines.append(f"Wait, that is wrong: {left} {op} {right} = {result}.")
        else:
            lines.append(f"{left} {op} {right} = {result}.")
    if steps:
        left, op, right, result = steps[-1]
        lines.append(f"Check: {result} {INVERSE[op]} {right} = {left}. Right.")
    lines.append(f"So the answer is {value}.")
    return "\n".join(lines), str(value)


@dataclass
class ProceduralTeacher:
    """`chat()` like any backend: the last user message is the question."""

    kind: str = "arithmetic"
    slip_rate: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind != "arithmetic":
            from server.errors import InvalidConfigError

            raise InvalidConfigError(f"procedural: unknown kind {self.kind!r} (known: arithmetic)")
        self.name = f"procedural:{self.kind}:slip{self.slip_rate}:seed{self.seed}"

    def chat(self, conversations: list[Messages], progress: str | None = None) -> list[Reply]:
        replies = []
        for messages in conversations:
            question = messages[-1]["content"]
            digest = hashlib.blake2b(f"{self.seed}:{question}".encode(), digest_size=8).digest()
            try:
                thinking, attempt = trace(question, random.Random(int.from_bytes(digest, "little")), self.slip_rate)
                replies.append(Reply(content=attempt, reasoning=thinking))
            except ParseError as exc:
                replies.append(Reply(error=f"procedural teacher: {exc}"))
        return replies
