"""bench/recipe.py at CI size: every stage of the s1 recipe through the real commands (reasoning-gym
problems -> build-dataset -> train -> serve -> eval sweeps), each stage's output feeding the next."""

import json
import subprocess
import sys
from pathlib import Path

from .conftest import build_tiny_model

ROOT = Path(__file__).parents[1]


def test_the_recipe_runs_every_stage_and_each_feeds_the_next(tmp_path):
    student = build_tiny_model(tmp_path / "student", "llama")
    work, results = tmp_path / "work", tmp_path / "results"
    done = subprocess.run([sys.executable, "bench/recipe.py", "--quick", str(student), "--work", str(work),
                           "--out-dir", str(results)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [path] = results.glob("recipe-*-quick.json")
    report = json.loads(path.read_text())
    funnel = dict((stage, count) for stage, count in report["funnel"]["funnel"])
    assert funnel["sources"] == 48 and funnel["select"] == 16 and funnel["decontaminate"] > 40
    # build-dataset -> train: the s1K files carry the procedural teacher's traces, and training ran on them.
    rows = [json.loads(line) for line in (work / "data" / "s1k.jsonl").read_text().rstrip("\n").split("\n")]
    assert len(rows) == 16 and all(r["thinking_trajectories"][0].startswith("One operation at a time.") for r in rows)
    assert report["train"]["metrics"]["global_step"] == 2
    # train -> serve -> eval: the trained directory served unchanged, answers in the think/answer format.
    runs = [json.loads(line) for line in (work / "eval" / "max_think" / "results.jsonl").read_text().splitlines()]
    assert len(runs) == 3 * report["eval_questions"]
    assert all(r["think_tokens"] <= r["budget"] and r["answer_tokens"] > 0 for r in runs)
    for name in ("max_think", "min_think_waits1", "min_think_waits2", "min_think_waits4", "rejection"):
        methods = report["sweeps"][name]["methods"]
        assert methods["budget_forcing"]["control"] == 1.0
    assert "rejection_sampling" in report["sweeps"]["rejection"]["methods"]
    assert list(results.glob("recipe-*-max_think-*.png")) and set(report["times_s"]) >= {"build_dataset", "train", "total"}
