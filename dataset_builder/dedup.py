"""Stage 2: deduplicate (normalized exact match, then MinHash near-duplicates) and decontaminate
against evaluation sets (word n-gram overlap, n = 8 as in the paper). Every dropped question is
reported with what it collided with: the kept duplicate, or the eval item and its file."""

import hashlib
from dataclasses import dataclass, field

import numpy as np

from server.errors import InvalidConfigError

from .io import load_table
from .text import ngrams, normalize, words


def _hash64(token: str) -> int:
    """A stable 64-bit hash (Python's `hash` changes between processes, and num_proc forks)."""
    return int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little")


@dataclass
class MinHasher:
    """MinHash signatures of word-shingle sets: P(signatures agree at a position) = Jaccard."""

    num_perm: int = 128
    shingle: int = 2
    seed: int = 1

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        self.a = rng.integers(1, 2**63, self.num_perm, dtype=np.uint64) | np.uint64(1)  # odd multipliers
        self.b = rng.integers(0, 2**63, self.num_perm, dtype=np.uint64)

    def shingle_hashes(self, text: str) -> np.ndarray:
        """Sorted unique 64-bit hashes of the text's word shingles (its set, as numbers)."""
        shingles = [" ".join(g) for g in ngrams(words(text), self.shingle)] or [""]
        return np.unique(np.array([_hash64(s) for s in shingles], dtype=np.uint64))

    def signature(self, hashes: np.ndarray) -> np.ndarray:
        # a*x + b modulo 2^64 (uint64 wraps): with odd a, a permutation of the 64-bit values per position.
        return (hashes[:, None] * self.a + self.b).min(axis=0)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two sorted unique hash arrays."""
    common = len(np.intersect1d(a, b, assume_unique=True))
    return common / max(1, len(a) + len(b) - common)


@dataclass
class Dropped:
    index: int  # row in the stage's input
    reason: str  # "exact_duplicate", "near_duplicate", "eval_overlap"
    collided_with: str  # what it matched: a kept row, or an eval item
    similarity: float | None = None


@dataclass
class DedupConfig:
    near_duplicate_threshold: float = 0.92  # Jaccard of word-bigram sets; 0 turns near-dedup off
    num_perm: int = 128
    bands: int = 16  # LSH bands x rows = num_perm (candidates from J ~ 0.7 up); each is checked by its exact Jaccard
    seed: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.near_duplicate_threshold <= 1:
            raise InvalidConfigError(f"dedup.near_duplicate_threshold: must be in [0, 1], got {self.near_duplicate_threshold}")
        if self.num_perm % self.bands:
            raise InvalidConfigError(f"dedup.bands: {self.bands} must divide num_perm {self.num_perm}")


@dataclass
class Deduplicate:
    """Dataset -> Dataset without duplicates; `dropped` lists what went and why."""

    config: DedupConfig = field(default_factory=DedupConfig)
    num_proc: int | None = None
    dropped: list[Dropped] = field(default_factory=list)

    def __call__(self, data):
        cfg = self.config
        hasher = MinHasher(cfg.num_perm, seed=cfg.seed)

        def sign(batch: dict) -> dict:
            hashes = [hasher.shingle_hashes(q) for q in batch["question"]]
            return {"_key": [normalize(q) for q in batch["question"]],
                    "_sig": [hasher.signature(h) for h in hashes], "_sh": hashes}

        # All the text work (normalizing, shingling, hashing) is this one parallel map (num_proc);
        # what follows are sequential sweeps over numbers.
        signed = data.map(sign, batched=True, batch_size=1000, num_proc=self.num_proc,
                          remove_columns=data.column_names, desc="Dedup hashes")
        keep = np.ones(len(data), dtype=bool)
        first_seen: dict[str, int] = {}
        for i, key in enumerate(signed.data.column("_key").to_pylist()):
            if key in first_seen:
                keep[i] = False
                self.dropped.append(Dropped(i, "exact_duplicate", f"row {first_seen[key]}: {data[first_seen[key]]['question'][:80]}"))
            else:
                first_seen[key] = i
        if cfg.near_duplicate_threshold > 0:
            self._near_duplicates(data, signed, keep)
        return data.select(np.flatnonzero(keep))

    def _near_duplicates(self, data, signed, keep: np.ndarray) -> None:
        """MinHash + LSH find candidate pairs in near-linear time; the exact Jaccard of the two
        shingle sets decides, so neither the MinHash estimate's noise nor a key collision drops a question."""
        cfg = self.config
        # Straight from the Arrow columns; row-by-row formatting would cost more than the hashing.
        column = signed.data.column("_sig").combine_chunks()
        signatures = column.flatten().to_numpy().astype(np.uint64).reshape(len(signed), cfg.num_perm)
        sets = signed.data.column("_sh").combine_chunks()
        offsets, values = sets.offsets.to_numpy(), sets.flatten().to_numpy().astype(np.uint64)

        def shingle_set(i: int) -> np.ndarray:
            return values[offsets[i] : offsets[i + 1]]

        questions = data["question"]
        # One 64-bit key per (row, band): a wrapping dot product of the band's values. A collision
        # only adds a candidate, which the exact Jaccard below then rejects.
        mix = np.random.default_rng(cfg.seed).integers(1, 2**63, cfg.num_perm // cfg.bands, dtype=np.uint64) | np.uint64(1)
        band_keys = (signatures.reshape(len(signatures), cfg.bands, -1) * mix).sum(axis=2, dtype=np.uint64)
        buckets: dict[tuple[int, int], list[int]] = {}
        for i in np.flatnonzero(keep):  # in order: the first of a cluster is the one kept
            i = int(i)
            keys = list(enumerate(band_keys[i].tolist()))
            candidates = {j for key in keys for j in buckets.get(key, ())}
            best, best_j = None, 0.0
            for j in sorted(candidates):
                similarity = jaccard(shingle_set(i), shingle_set(j))
                if similarity >= cfg.near_duplicate_threshold and similarity > best_j:
                    best, best_j = j, similarity
            if best is not None:
                keep[i] = False
                self.dropped.append(Dropped(i, "near_duplicate", f"row {best}: {questions[best][:80]}", best_j))
                continue
            for key in keys:
                buckets.setdefault(key, []).append(i)


@dataclass
class EvalSet:
    path: str
    question_field: str = "question"


def template_affixes(questions: list[list[str]], share: float) -> tuple[set, set]:
    """Word prefixes and suffixes that at least `share` of the questions (and two of them) open
    or close with: a generator's template ("state the final answer to the following arithmetic
    problem"), which is boilerplate, not evidence of contamination."""
    from collections import Counter

    prefixes, suffixes = Counter(), Counter()
    for tokens in questions:
        prefixes.update(tuple(tokens[:k]) for k in range(1, len(tokens)))
        suffixes.update(tuple(tokens[-k:]) for k in range(1, len(tokens)))
    least = max(2, share * len(questions))
    return {p for p, c in prefixes.items() if c >= least}, {q for q, c in suffixes.items() if c >= least}


def strip_affixes(tokens: list[str], prefixes: set, suffixes: set) -> list[str]:
    """`tokens` without the longest template prefix and suffix they carry."""
    start = next((k for k in range(len(tokens) - 1, 0, -1) if tuple(tokens[:k]) in prefixes), 0)
    end = next((k for k in range(len(tokens) - start - 1, 0, -1) if tuple(tokens[-k:]) in suffixes), 0)
    return tokens[start : len(tokens) - end]


@dataclass
class Decontaminate:
    """Drops every question sharing a word n-gram with an evaluation question.

    With `template_share` > 0, word prefixes and suffixes common to that share of an eval set's
    questions are taken off both sides first, so templated generators (reasoning-gym) are compared
    on what varies; a question whose rest is shorter than n then matches only an equal rest."""

    eval_sets: list[EvalSet]
    n: int = 8
    template_share: float = 0.0
    num_proc: int | None = None
    dropped: list[Dropped] = field(default_factory=list)

    def __call__(self, data):
        index: dict[tuple[str, ...], str] = {}
        prefixes, suffixes = set(), set()
        for spec in self.eval_sets:
            table = load_table(spec.path)
            if spec.question_field not in table.column_names:
                raise InvalidConfigError(
                    f"decontaminate: {spec.path} has no field {spec.question_field!r}; it has {sorted(table.column_names)}"
                )
            tokenized = [words(q) for q in table[spec.question_field]]
            if self.template_share > 0:
                pre, suf = template_affixes(tokenized, self.template_share)
                prefixes, suffixes = prefixes | pre, suffixes | suf
                tokenized = [strip_affixes(t, pre, suf) for t in tokenized]
            for k, (question, tokens) in enumerate(zip(table[spec.question_field], tokenized)):
                for gram in ngrams(tokens, self.n):
                    index.setdefault(gram, f"{spec.path}#{k}: {question[:80]}")
        n = self.n

        def find(batch: dict) -> dict:
            hits = []
            for question in batch["question"]:
                tokens = strip_affixes(words(question), prefixes, suffixes) if prefixes or suffixes else words(question)
                hit = next((index[g] for g in ngrams(tokens, n) if g in index), "")
                hits.append(hit)
            return {"_eval_hit": hits}

        found = data.map(find, batched=True, batch_size=1000, num_proc=self.num_proc,
                         remove_columns=data.column_names, desc="Decontaminating")["_eval_hit"]
        keep = []
        for i, hit in enumerate(found):
            if hit:
                self.dropped.append(Dropped(i, "eval_overlap", hit))
            else:
                keep.append(i)
        return data.select(keep)
