"""The s1 paper's test-time-scaling scores over a budget sweep, computed from per-run records.

Each record has `budget`, `think_tokens`, `correct` and the requested range `min_think` /
`max_think`. Per budget: accuracy, mean and percentile thinking tokens, Waits.
- Control: the fraction of runs whose thinking stayed within the requested range.
- Scaling: the average slope of accuracy over mean thinking tokens between consecutive budget
  points (reported per 1k tokens, so numbers read like "accuracy points per 1k tokens").
- Performance: the best accuracy over the sweep.
For comparing methods at equal cost, each point also has the mean *total* generated tokens per
question (every sample and every probe included: `total_tokens`), and each method a Scaling
over those (`scaling_per_1k_total_tokens`).
"""

import statistics


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def per_budget(records: list[dict]) -> list[dict]:
    points = []
    for budget in sorted({r["budget"] for r in records}):
        runs = [r for r in records if r["budget"] == budget]
        tokens = [r["think_tokens"] for r in runs]
        points.append({
            "budget": budget,
            "runs": len(runs),
            "correct": sum(bool(r["correct"]) for r in runs),
            "accuracy": sum(bool(r["correct"]) for r in runs) / len(runs),
            "mean_think_tokens": statistics.fmean(tokens),
            "p50_think_tokens": percentile(tokens, 50),
            "p90_think_tokens": percentile(tokens, 90),
            "max_think_tokens": max(tokens),
            "mean_waits": statistics.fmean(r.get("num_waits", 0) for r in runs),
            "within_budget": sum(in_range(r) for r in runs) / len(runs),
            "mean_total_tokens": statistics.fmean(r.get("total_tokens", r["think_tokens"] + r.get("answer_tokens", 0))
                                                  for r in runs),
        })
    return points


def in_range(record: dict) -> bool:
    lo = record.get("min_think") or 0
    hi = record.get("max_think") or float("inf")
    return lo <= record["think_tokens"] <= hi


def control(records: list[dict]) -> float:
    return sum(in_range(r) for r in records) / len(records) if records else 0.0


def scaling(points: list[dict], x: str = "mean_think_tokens") -> float:
    """Mean slope (accuracy per 1k tokens of `x`) between consecutive budget points; points
    whose `x` did not grow are skipped (no slope is defined there)."""
    slopes = []
    for a, b in zip(points, points[1:]):
        dx = b[x] - a[x]
        if dx > 0:
            slopes.append((b["accuracy"] - a["accuracy"]) / dx * 1000)
    return statistics.fmean(slopes) if slopes else 0.0


def performance(points: list[dict]) -> float:
    return max((p["accuracy"] for p in points), default=0.0)


def summarize(records: list[dict]) -> dict:
    """Scores per method ("budget_forcing", "rejection_sampling", "parallel_vote", "adaptive")."""
    summary = {}
    for method in sorted({r["method"] for r in records}):
        runs = [r for r in records if r["method"] == method]
        points = per_budget(runs)
        summary[method] = {"control": control(runs), "scaling_per_1k_tokens": scaling(points),
                           "scaling_per_1k_total_tokens": scaling(points, "mean_total_tokens"),
                           "performance": performance(points), "runs": len(runs), "per_budget": points}
    return summary
