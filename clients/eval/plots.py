"""PNG plots of a sweep: accuracy against mean thinking tokens per method (the s1 paper's
Figure-1 view) and thinking-token histograms per budget."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

SIZE_IN, DPI = (6.4, 4.8), 100  # 640 x 480 pixels


def plot_sweep(records: list[dict], summary: dict, out_dir: Path) -> list[Path]:
    paths = []
    fig, ax = plt.subplots(figsize=SIZE_IN, dpi=DPI)
    for method, scores in summary["methods"].items():
        points = scores["per_budget"]
        ax.plot([p["mean_think_tokens"] for p in points], [100 * p["accuracy"] for p in points], marker="o",
                label=method.replace("_", " "))
        for p in points:
            ax.annotate(str(p["budget"]), (p["mean_think_tokens"], 100 * p["accuracy"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("average thinking tokens")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("test-time scaling")
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(out_dir / "accuracy_vs_think_tokens.png")
    fig.savefig(paths[-1])
    plt.close(fig)

    # Equal cost: accuracy against everything generated per question, the three methods on one chart.
    fig, ax = plt.subplots(figsize=SIZE_IN, dpi=DPI)
    for method, scores in summary["methods"].items():
        points = scores["per_budget"]
        ax.plot([p["mean_total_tokens"] for p in points], [100 * p["accuracy"] for p in points], marker="o",
                label=f"{method.replace('_', ' ')} (performance {100 * scores['performance']:.0f}%,"
                      f" scaling {100 * scores['scaling_per_1k_total_tokens']:+.0f} pp/1k tokens)")
        for p in points:
            label = f"n={p['budget']}" if method == "parallel_vote" else str(p["budget"])
            ax.annotate(label, (p["mean_total_tokens"], 100 * p["accuracy"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    ax.set_xscale("log")
    ax.set_xlabel("total generated tokens per question (all samples and probes)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("test-time scaling at equal token cost")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    paths.append(out_dir / "accuracy_vs_total_tokens.png")
    fig.savefig(paths[-1])
    plt.close(fig)

    records = [r for r in records if r["method"] != "parallel_vote"]  # its "budget" is n
    budgets = sorted({r["budget"] for r in records})
    fig, axes = plt.subplots(len(budgets), 1, figsize=SIZE_IN, dpi=DPI, squeeze=False)
    for ax, budget in zip(axes[:, 0], budgets):
        tokens = [r["think_tokens"] for r in records if r["budget"] == budget]
        ax.hist(tokens, bins=20)
        ax.axvline(budget, color="red", linestyle="--", linewidth=1)
        ax.set_ylabel(f"budget {budget}", fontsize=7)
    axes[-1, 0].set_xlabel("thinking tokens")
    fig.tight_layout()
    paths.append(out_dir / "think_tokens_hist.png")
    fig.savefig(paths[-1])
    plt.close(fig)
    return paths
