"""The curation pipeline: a YAML/TOML config names the sources, the stages to run and their
settings; `build(config)` runs sources -> dedup -> decontaminate -> quality -> difficulty ->
traces -> domains -> select and writes the s1K files and the funnel report.

Paths in the config (sources, eval sets) are relative to the config file, so a config travels
with its data; `out` and `cache_dir` are relative to the working directory.
"""

import json
import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from server.errors import InvalidConfigError

from .backends import make_backend
from .cache import ResultCache
from .dedup import Decontaminate, DedupConfig, Deduplicate, EvalSet
from .difficulty import DifficultyFilter, LLMJudge, math_verify_grader
from .domains import DomainClassifier
from .quality import QualityFilter
from .report import Funnel, write_outputs
from .select import DiversitySelect
from .sources import SourceSpec, load_sources
from .traces import TraceWriter

log = logging.getLogger(__name__)

STAGES = ("dedup", "decontaminate", "quality", "difficulty", "traces", "domains", "select")


@dataclass
class PipelineConfig:
    sources: list[SourceSpec]
    out: str = "s1k-out"
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    eval_sets: list[EvalSet] = field(default_factory=list)
    num_proc: int | None = None
    cache_dir: str = ""  # per-item model results; empty: `<out>.cache`
    cot_type: str = "math"
    dedup: dict = field(default_factory=dict)
    decontaminate: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)
    difficulty: dict = field(default_factory=dict)
    traces: dict = field(default_factory=dict)
    domains: dict = field(default_factory=dict)
    select: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise InvalidConfigError(f"stages: unknown {unknown}; stages are {list(STAGES)}")
        if "traces" not in self.stages:
            raise InvalidConfigError("stages: 'traces' is required (the s1K schema holds the traces)")
        if "select" in self.stages and "domains" not in self.stages:
            raise InvalidConfigError("stages: 'select' samples by domain, so it needs 'domains'")
        if "decontaminate" in self.stages and not self.eval_sets:
            raise InvalidConfigError("eval_sets: 'decontaminate' needs at least one evaluation set")
        if "difficulty" in self.stages and not self.difficulty.get("solvers"):
            raise InvalidConfigError("difficulty.solvers: 'difficulty' needs at least one solver")
        if not self.traces.get("teacher"):
            raise InvalidConfigError("traces.teacher: the traces stage needs a teacher backend")


def load_pipeline_config(path: str | Path, **overrides) -> PipelineConfig:
    path = Path(path)
    if not path.is_file():
        raise InvalidConfigError(f"config: {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text()) if path.suffix == ".toml" else yaml.safe_load(path.read_text())
    except (ValueError, yaml.YAMLError) as exc:
        raise InvalidConfigError(f"config: {path} cannot be parsed: {exc}") from exc
    if not isinstance(raw, dict):
        raise InvalidConfigError(f"config: {path} must hold a mapping")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    base = path.parent

    def local(p: str) -> str:
        return str(p if Path(p).is_absolute() else (base / p))

    try:
        raw["sources"] = [SourceSpec(**{**s, **({"path": local(s["path"])} if s.get("path") else {})})
                          for s in raw.get("sources") or []]
        raw["eval_sets"] = [EvalSet(**{**e, "path": local(e["path"])}) for e in raw.get("eval_sets") or []]
        return PipelineConfig(**raw)
    except (TypeError, KeyError) as exc:
        raise InvalidConfigError(f"config: {path}: {exc}") from exc


class Backends:
    """One backend per distinct spec: a solver and a teacher on the same model share one engine."""

    def __init__(self):
        self.built: dict[str, object] = {}

    def get(self, spec: dict | str):
        spec = {"engine": spec} if isinstance(spec, str) else spec
        key = json.dumps(spec, sort_keys=True)
        if key not in self.built:
            self.built[key] = make_backend(spec)
        return self.built[key]


def _dropped(stage, before) -> list[dict]:
    questions = before["question"]
    return [{"question": questions[d.index][:120], "reason": d.reason, "collided_with": d.collided_with,
             **({"similarity": round(d.similarity, 3)} if d.similarity is not None else {})} for d in stage.dropped]


def build(config: PipelineConfig) -> dict:
    """Run the pipeline; returns the paths written and the funnel."""
    from transformers import AutoTokenizer

    cache_dir = Path(config.cache_dir or f"{config.out}.cache")
    backends, funnel = Backends(), Funnel()
    data = load_sources(config.sources)  # every source is read (and checked) before any model runs
    funnel.record("sources", data)
    run = set(config.stages)
    if "dedup" in run:
        stage = Deduplicate(DedupConfig(**config.dedup), num_proc=config.num_proc)
        before, data = data, stage(data)
        funnel.record("dedup", data, dropped=_dropped(stage, before))
    if "decontaminate" in run:
        stage = Decontaminate(config.eval_sets, num_proc=config.num_proc, **config.decontaminate)
        before, data = data, stage(data)
        funnel.record("decontaminate", data, dropped=_dropped(stage, before))
    if "quality" in run:
        stage = QualityFilter(num_proc=config.num_proc, **config.quality)
        data = stage(data)
        funnel.record("quality", data, rule_counts=stage.rule_counts, trusted=sum(data["trusted"]))
    if "difficulty" in run:
        settings = dict(config.difficulty)
        solvers = [backends.get(s) for s in settings.pop("solvers")]
        grader = settings.pop("grader", "math")
        grader = math_verify_grader if grader == "math" else LLMJudge(backends.get(grader["llm_judge"]))
        stage = DifficultyFilter(solvers, grader, ResultCache(cache_dir / "difficulty.jsonl"), **settings)
        data = stage(data)
        funnel.record("difficulty", data, solved_by=stage.solved, ungraded=stage.ungraded, failed_requests=stage.failed_requests)
    settings = dict(config.traces)
    teacher = backends.get(settings.pop("teacher"))
    tokenizer_dir = settings.pop("tokenizer", None) or getattr(teacher, "model_dir", None)
    if tokenizer_dir is None:
        raise InvalidConfigError("traces.tokenizer: an endpoint teacher needs the target model's tokenizer directory")
    if tokenizer_dir == "default":
        from server.models.default_model import default_model_dir

        tokenizer_dir = str(default_model_dir())
    stage = TraceWriter(teacher, AutoTokenizer.from_pretrained(tokenizer_dir), ResultCache(cache_dir / "traces.jsonl"), **settings)
    data = stage(data)
    funnel.record("traces", data, failures=stage.failures)
    if "domains" in run:
        settings = dict(config.domains)
        classifier = settings.pop("classifier", "keyword")
        stage = DomainClassifier(None if classifier == "keyword" else backends.get(classifier), **settings)
        data = stage(data)
        funnel.record("domains", data, fallbacks=stage.fallbacks)
    if "select" in run:
        data = DiversitySelect(**config.select)(data)
        funnel.record("select", data)
    else:
        data = data.filter(lambda error: not error, input_columns="trace_error")
    paths = write_outputs(data, funnel, Path(config.out), config.cot_type)
    log.info("wrote %d questions to %s", len(data), config.out)
    return {"paths": paths, "funnel": funnel}
