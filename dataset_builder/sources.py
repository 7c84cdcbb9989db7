"""Stage 1: local sources -> one table in the pipeline's schema.

Every source is a file or `save_to_disk` directory plus a field mapping onto `question`,
`solution` and `answer`; the remaining fields go to `metadata` (a JSON string, as in s1K).
`S1_SOURCES` documents the paper's 16 sources by name with the fields their public releases use,
so a user who has them on disk names the source and points at the path. Nothing is downloaded.
"""

import json
from dataclasses import dataclass, field

from server.errors import DataError, InvalidConfigError

from .io import load_table

# The pipeline's working schema; `trusted` marks the paper's hand-picked sources (their items skip
# the difficulty filter and are always selected).
COLUMNS = ("question", "solution", "answer", "source_type", "metadata", "trusted")
TARGET_FIELDS = ("question", "solution", "answer")


@dataclass(frozen=True)
class RegistryEntry:
    source_type: str  # the s1K `source_type` value
    fields: dict[str, str]  # our field -> the release's field
    note: str = ""


S1_SOURCES = {
    "numinamath": RegistryEntry("AI-MO/NuminaMath-CoT", {"question": "problem", "solution": "solution"}, "answer inside \\boxed{} of the solution"),
    "math": RegistryEntry("qfq/openaimath", {"question": "problem", "solution": "solution", "answer": "answer"}, "MATH train split"),
    "olympicarena": RegistryEntry("GAIR/OlympicArena", {"question": "problem", "solution": "solution", "answer": "answer"}),
    "omnimath": RegistryEntry("KbsdJames/Omni-MATH", {"question": "problem", "solution": "solution", "answer": "answer"}),
    "agieval": RegistryEntry("baber/agieval", {"question": "query", "solution": "solution", "answer": "gold"}, "SAT, LSAT, GRE/GMAT subsets"),
    "olympiadbench": RegistryEntry("Hothan/OlympiadBench", {"question": "question", "solution": "solution", "answer": "final_answer"}),
    "theoremqa": RegistryEntry("TIGER-Lab/TheoremQA", {"question": "Question", "answer": "Answer"}),
    "jeebench": RegistryEntry("daman1209arora/jeebench", {"question": "question", "answer": "gold"}),
    "gpqa": RegistryEntry("Idavidrein/gpqa", {"question": "Question", "solution": "Explanation", "answer": "Correct Answer"}, "only the non-Diamond items"),
    "scieval": RegistryEntry("OpenDFM/SciEval", {"question": "question", "answer": "answer"}),
    "usaco": RegistryEntry("codegenning/usacobench_formatted", {"question": "question", "solution": "solution"}),
    "livecodebench": RegistryEntry("livecodebench/code_generation_lite", {"question": "question_content"}, "items before the eval cut-off"),
    "aime": RegistryEntry("qq8933/AIME_1983_2024", {"question": "Question", "answer": "Answer"}, "1983-2021 only"),
    "xword": RegistryEntry("0xharib/xword1", {"question": "input", "answer": "output"}, "cryptic crosswords"),
    "s1-prob": RegistryEntry("qfq/stats_qual", {"question": "question", "solution": "solution"}, "Stanford statistics PhD qualifying exams (trusted)"),
    "s1-teasers": RegistryEntry("qfq/quant", {"question": "question", "solution": "solution"}, "quantitative brain-teasers (trusted)"),
}


@dataclass
class SourceSpec:
    """One source in a pipeline config: a file (`path`) or a reasoning-gym generator
    (`reasoning_gym: TASK` with `size`, `seed` and the generator's `task_config`)."""

    path: str = ""
    reasoning_gym: str = ""  # a reasoning-gym task name, instead of a path
    size: int = 0
    seed: int = 0
    task_config: dict = field(default_factory=dict)
    name: str = ""  # a key of S1_SOURCES: its source_type and fields become the defaults
    source_type: str = ""
    fields: dict[str, str] = field(default_factory=dict)  # our field -> the source's field
    metadata_fields: list[str] | None = None  # None: every unmapped field
    trusted: bool = False
    limit: int | None = None  # only the first N rows (for trying a config on a big source)
    split: str = "train"

    def __post_init__(self) -> None:
        if bool(self.path) == bool(self.reasoning_gym):
            raise InvalidConfigError("sources: each source has either a path or a reasoning_gym task")
        if self.reasoning_gym:
            if self.size < 1:
                raise InvalidConfigError(f"sources: reasoning_gym {self.reasoning_gym}: size must be at least 1")
            self.source_type = self.source_type or f"reasoning_gym/{self.reasoning_gym}"
            self.fields = {"question": "question", "answer": "answer"}
            return
        if self.name and self.name not in S1_SOURCES:
            raise InvalidConfigError(f"sources: unknown source name {self.name!r}; known: {sorted(S1_SOURCES)}")
        entry = S1_SOURCES.get(self.name)
        self.fields = {**(entry.fields if entry else {}), **self.fields}
        self.source_type = self.source_type or (entry.source_type if entry else self.name) or self.path
        unknown = sorted(set(self.fields) - set(TARGET_FIELDS))
        if unknown:
            raise InvalidConfigError(f"sources: {self.path}: mapping names unknown targets {unknown}; targets are {TARGET_FIELDS}")
        if "question" not in self.fields:
            self.fields["question"] = "question"


def _text(value) -> str | None:
    """A mapped value as text: lists (OlympiadBench's final_answer) join, numbers format."""
    if value is None:
        return None
    if isinstance(value, list):
        return "\n".join(str(v) for v in value)
    return str(value)


def load_source(spec: SourceSpec):
    """One source as a Dataset in the pipeline's schema."""
    if spec.reasoning_gym:
        import datasets

        from .reasoning_gym_source import rows

        generated = rows(spec.reasoning_gym, spec.size, spec.seed, spec.task_config)
        return datasets.Dataset.from_list([
            {"question": r["question"], "solution": None, "answer": r["answer"], "source_type": spec.source_type,
             "metadata": json.dumps({"task": r["task"], "entry": json.loads(r["metadata"])}), "trusted": spec.trusted}
            for r in generated
        ])
    data = load_table(spec.path, split=spec.split)
    missing = sorted({name for name in spec.fields.values() if name not in data.column_names})
    if missing:
        raise DataError(f"{spec.path}: the mapping names fields {missing} that the source does not have; it has {sorted(data.column_names)}")
    if spec.limit is not None:
        data = data.select(range(min(spec.limit, len(data))))
    mapped = set(spec.fields.values())
    extra = spec.metadata_fields if spec.metadata_fields is not None else [c for c in data.column_names if c not in mapped]
    spec_fields, source_type, trusted = dict(spec.fields), spec.source_type, spec.trusted

    def convert(row: dict) -> dict:
        question = _text(row[spec_fields["question"]]) or ""
        return {
            "question": question,
            "solution": _text(row[spec_fields["solution"]]) if "solution" in spec_fields else None,
            "answer": _text(row[spec_fields["answer"]]) if "answer" in spec_fields else None,
            "source_type": source_type,
            "metadata": json.dumps({k: row[k] for k in extra if k in row}, ensure_ascii=False, default=str),
            "trusted": trusted,
        }

    return data.map(convert, remove_columns=data.column_names, desc=f"Loading {source_type}")


def load_sources(specs: list[SourceSpec]):
    import datasets

    if not specs:
        raise InvalidConfigError("sources: the config names no source")
    tables = [load_source(spec) for spec in specs]
    features = datasets.Features({
        "question": datasets.Value("string"), "solution": datasets.Value("string"), "answer": datasets.Value("string"),
        "source_type": datasets.Value("string"), "metadata": datasets.Value("string"), "trusted": datasets.Value("bool"),
    })
    return datasets.concatenate_datasets([t.cast(features) for t in tables])
