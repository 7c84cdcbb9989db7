"""Stage 3: rule filters for the defects the paper names. Each rule is a named predicate; every
rule that fires on an item is counted, and an item any rule fires on is dropped. Items of the
trusted sources (the paper's 384 hand-picked ones) are marked here: they skip the difficulty
filter and are always selected."""

import re
from dataclasses import dataclass, field

from .text import words

ERROR_PATTERNS = re.compile(
    r"^\s*(error\b|exception\b|traceback)|request failed|rate limit|internal server error|status (4|5)\d\d|\bapi error\b",
    re.IGNORECASE | re.MULTILINE,
)
FIGURE_REFERENCE = re.compile(r"\b(figure|fig\.|diagram|picture|image|graph shown|shown below|illustrated)\b", re.IGNORECASE)
FIGURE_PRESENT = re.compile(r"\[asy\]|<img|!\[|\\includegraphics|\\begin\{tikzpicture\}", re.IGNORECASE)
DRAWING_LINE = re.compile(r"^[\s/\\|_\-+=*#.:<>^v()]{4,}$")
NUMBERED_LINE = re.compile(r"^\s*\(?(\d{1,2})[.)]\s", re.MULTILINE)


def empty_answer(row: dict, min_words: int) -> bool:
    return not (row["solution"] or "").strip() and not (row["answer"] or "").strip()


def error_answer(row: dict, min_words: int) -> bool:
    return any(ERROR_PATTERNS.search(text or "") for text in (row["solution"], row["answer"]))


def ascii_art(row: dict, min_words: int) -> bool:
    """Three or more lines drawn with punctuation only: a diagram the model cannot see as such."""
    drawn = [line for line in row["question"].splitlines() if line.strip() and DRAWING_LINE.match(line)]
    return len(drawn) >= 3


def missing_figure(row: dict, min_words: int) -> bool:
    text = row["question"]
    return bool(FIGURE_REFERENCE.search(text)) and not FIGURE_PRESENT.search(text) and not ascii_art(row, min_words)


def broken_numbering(row: dict, min_words: int) -> bool:
    """Numbered parts that do not run 1, 2, 3, ... (a part lost in scraping)."""
    numbers = [int(n) for n in NUMBERED_LINE.findall(row["question"])]
    return len(numbers) >= 2 and numbers != list(range(numbers[0], numbers[0] + len(numbers)))


def too_short(row: dict, min_words: int) -> bool:
    return len(words(row["question"])) < min_words


RULES = {f.__name__: f for f in (empty_answer, error_answer, ascii_art, missing_figure, broken_numbering, too_short)}


def failed_rules(row: dict, min_words: int = 4) -> list[str]:
    return [name for name, rule in RULES.items() if rule(row, min_words)]


@dataclass
class QualityFilter:
    """Dataset -> Dataset of the items no rule fires on; `rule_counts` says how often each fired."""

    min_question_words: int = 4
    trusted_sources: list[str] = field(default_factory=list)
    num_proc: int | None = None
    rule_counts: dict[str, int] = field(default_factory=dict)

    def __call__(self, data):
        min_words, trusted = self.min_question_words, set(self.trusted_sources)
        marked = data.map(
            lambda row: {"_failed": failed_rules(row, min_words), "trusted": row["trusted"] or row["source_type"] in trusted},
            num_proc=self.num_proc, desc="Quality rules",
        )
        self.rule_counts = {name: 0 for name in RULES}
        for failed in marked["_failed"]:
            for name in failed:
                self.rule_counts[name] += 1
        kept = marked.filter(lambda failed: not failed, input_columns="_failed", num_proc=self.num_proc)
        return kept.remove_columns("_failed")
