"""Stage 8: write the s1K schema (save_to_disk, Parquet, JSONL) and the funnel report (JSON and a
PNG chart): counts after every stage, per source and per domain."""

import json
from dataclasses import dataclass, field
from pathlib import Path

S1K_COLUMNS = ["question", "solution", "cot_type", "source_type", "metadata", "cot", "thinking_trajectories", "attempt"]


@dataclass
class Funnel:
    stages: list[dict] = field(default_factory=list)  # {"stage", "count", "by_source", "by_domain", "details"}

    def record(self, stage: str, data, **details) -> None:
        by_source: dict[str, int] = {}
        for source in data["source_type"]:
            by_source[source] = by_source.get(source, 0) + 1
        entry = {"stage": stage, "count": len(data), "by_source": by_source}
        if "domain" in data.column_names:
            by_domain: dict[str, int] = {}
            for domain in data["domain"]:
                by_domain[domain] = by_domain.get(domain, 0) + 1
            entry["by_domain"] = dict(sorted(by_domain.items()))
        entry["details"] = details
        self.stages.append(entry)

    def to_json(self) -> dict:
        return {"funnel": [(s["stage"], s["count"]) for s in self.stages], "stages": self.stages}


def to_s1k(data, cot_type: str = "math"):
    """The pipeline's table -> exactly the s1K columns, in s1K's order and types."""
    def convert(row: dict) -> dict:
        return {"question": row["question"], "solution": row["solution"], "cot_type": cot_type,
                "source_type": row["source_type"], "metadata": row["metadata"], "cot": None,
                "thinking_trajectories": [row["thinking_trajectory"]], "attempt": row["attempt"]}

    return data.map(convert, remove_columns=data.column_names, desc="s1K schema").select_columns(S1K_COLUMNS)


def plot_funnel(funnel: Funnel, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s["stage"] for s in funnel.stages]
    counts = [s["count"] for s in funnel.stages]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(names) + 1.5))
    bars = ax.barh(names[::-1], counts[::-1], color="#4c72b0")
    ax.bar_label(bars, labels=[f"{c:,}" for c in counts[::-1]], padding=3)
    ax.set_xlabel("questions")
    ax.set_title("s1K curation funnel")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(final, funnel: Funnel, out: Path, cot_type: str = "math") -> dict[str, Path]:
    """All files into `out`, which must not hold a previous result: written into a temporary
    sibling and renamed at the end, so a failed run never leaves output that looks finished."""
    import shutil
    import tempfile

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        s1k = to_s1k(final, cot_type)
        s1k.save_to_disk(str(tmp / "dataset"))
        s1k.to_parquet(str(tmp / "s1k.parquet"))
        s1k.to_json(str(tmp / "s1k.jsonl"), lines=True, force_ascii=False)
        (tmp / "funnel.json").write_text(json.dumps(funnel.to_json(), indent=2, ensure_ascii=False))
        plot_funnel(funnel, tmp / "funnel.png")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {name: out / name for name in ("dataset", "s1k.parquet", "s1k.jsonl", "funnel.json", "funnel.png")}
