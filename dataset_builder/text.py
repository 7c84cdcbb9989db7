"""Text normalization and n-grams shared by deduplication and decontamination."""

import re
import unicodedata

_NON_WORD = re.compile(r"[^\w\s]")
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Case-, accent-width- and punctuation-insensitive form: NFKC, lower case, punctuation
    removed, whitespace collapsed. Two questions equal after this are exact duplicates."""
    text = unicodedata.normalize("NFKC", text or "").lower()
    return _SPACE.sub(" ", _NON_WORD.sub(" ", text)).strip()


def words(text: str) -> list[str]:
    return normalize(text).split()


def ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    """Word n-grams; a text shorter than n is one n-gram of its own (so short texts still match)."""
    if len(tokens) < n:
        return {tuple(tokens)} if tokens else set()
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}
