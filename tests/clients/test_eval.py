"""The budget-sweep evaluator: graders, the paper's scores, a sweep through a real server, the
CLI, and the Grafana dashboard's PromQL against the metrics the server really exports."""

import json
import re
import struct
import urllib.request
from pathlib import Path

import pytest

from clients.errors import TaskError
from clients.eval import OfflineBackend, ServerBackend, SweepConfig, get_grader, load_task, run_sweep
from clients.eval.metrics import control, per_budget, performance, scaling, summarize
from server.cli import main

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "s1serve-dashboard.json"


@pytest.mark.parametrize("grader,reply,reference,expected", [
    ("math", "so the result is \\boxed{\\frac{1}{2}}.", "0.5", True),
    ("math", "We get \\boxed{\\dfrac{6}{12}} in the end", "\\frac{1}{2}", True),
    ("math", "Answer: 0.75", "\\frac{3}{4}", True),
    ("math", "Answer: 0.7", "\\frac{3}{4}", False),
    ("math", "first \\boxed{3} then corrected: \\boxed{4}", "4", True),
    ("math", "\\boxed{x^2+2x+1}", "(x+1)^2", True),
    ("math", "no final answer here at all", "5", False),
    ("multiple_choice", "I think the answer is (C). I am sure.", "C", True),
    ("multiple_choice", "Answer: B", "C", False),
    ("multiple_choice", "\\boxed{D}", "(D)", True),
    ("multiple_choice", "It could be A or B.\nFinal: (B)", "B", True),
    ("exact", "Answer: 42", "42", True),
    ("exact", "Answer: 42.0", "42", False),
    ("normalized", "The answer: The Eiffel Tower.", "eiffel tower", True),
    ("normalized", "Answer: 1,000", "1000", True),
    ("code", "```python\ndef add(a, b):\n    return a + b\n```", "assert add(2, 3) == 5", True),
    ("code", "```python\ndef add(a, b):\n    return a - b\n```", "assert add(2, 3) == 5", False),
    ("code", "```python\nimport sys\nsys.exit(1)\n```", "assert True", False),
])
def test_graders_on_tricky_cases(grader, reply, reference, expected):
    assert get_grader(grader)(reply, reference, {}) is expected


def test_the_reasoning_gym_grader_is_the_tasks_own_scorer():
    from dataset_builder.reasoning_gym_source import rows

    [record] = rows("chain_sum", 1, 3, {"min_terms": 3, "max_terms": 3})
    grade = get_grader("reasoning_gym")
    record = {**record, "grader": "reasoning_gym"}
    right, wrong = record["answer"], str(int(record["answer"]) + 1)
    assert grade(f"\nAnswer: {right}", right, record) and grade(f"\nFinal Answer: {right}", right, record)
    assert not grade(f"\nAnswer: {wrong}", right, record)
    with pytest.raises(TaskError, match="task"):
        grade("Answer: 1", "1", {"question": "q"})


def test_code_that_loops_forever_fails_after_the_timeout():
    from clients.eval.graders import code_grader

    assert code_grader("```python\nwhile True:\n    pass\n```", "assert True", {}, timeout_s=1) is False


def test_graded_code_has_no_network():
    from clients.eval.graders import code_grader

    reply = "```python\nimport urllib.request\nurllib.request.urlopen('http://example.com', timeout=2)\n```"
    assert code_grader(reply, "assert True", {}) is False
    reply = "```python\nimport socket\ntry:\n    socket.create_connection(('127.0.0.1', 9))\n    ok = False\n" \
            "except OSError as e:\n    ok = 'disabled' in str(e)\n```"
    assert code_grader(reply, "assert ok", {}) is True


@pytest.mark.parametrize("kind", ["parquet", "save_to_disk"])
def test_tasks_load_from_parquet_and_save_to_disk(tmp_path, kind):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"question": "1+1?", "answer": "2", "id": "q0"},
                                     {"question": "2+2?", "answer": "4", "id": "q1"}])
    path = tmp_path / ("task.parquet" if kind == "parquet" else "task")
    ds.to_parquet(str(path)) if kind == "parquet" else ds.save_to_disk(str(path))
    questions = load_task(str(path), grader="math")
    assert [(q.id, q.answer, q.grader) for q in questions] == [("q0", "2", "math"), ("q1", "4", "math")]


def run(budget, think, correct, lo=None):
    return {"method": "budget_forcing", "budget": budget, "think_tokens": think, "correct": correct,
            "min_think": lo, "max_think": budget, "num_waits": 0}


def test_scores_on_a_hand_made_sweep():
    records = [run(100, 80, False), run(100, 100, True),  # mean 90, accuracy 0.5
               run(200, 190, True), run(200, 210, True),  # mean 200, accuracy 1.0, one run over budget
               run(400, 390, True), run(400, 30, False, lo=50)]  # mean 210, accuracy 0.5, one under min
    points = per_budget(records)
    assert [p["accuracy"] for p in points] == [0.5, 1.0, 0.5]
    assert [p["mean_think_tokens"] for p in points] == [90, 200, 210]
    assert control(records) == pytest.approx(4 / 6)
    slopes = [(1.0 - 0.5) / 110 * 1000, (0.5 - 1.0) / 10 * 1000]
    assert scaling(points) == pytest.approx(sum(slopes) / 2)
    assert performance(points) == 1.0
    assert summarize(records)["budget_forcing"]["runs"] == 6


def test_bad_input_gives_clear_errors(tmp_path):
    with pytest.raises(TaskError, match="unknown grader 'nope'"):
        load_task("arith", grader="nope")
    bad = tmp_path / "task.jsonl"
    bad.write_text(json.dumps({"question": "1+1?"}) + "\n")
    with pytest.raises(TaskError, match="no 'answer' field"):
        load_task(str(bad), grader="math")
    with pytest.raises(TaskError, match="strictly increasing"):
        SweepConfig(budgets=[512, 256])
    with pytest.raises(TaskError, match="no such file"):
        load_task(str(tmp_path / "missing.jsonl"))
    assert main(["eval", "arith", "--budgets", "64,32", "--out", str(tmp_path / "o")]) == 2


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def scrape(server) -> dict:
    with urllib.request.urlopen(server.http_url + "/metrics") as r:
        text = r.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name_labels, value = line.rsplit(" ", 1)
            samples[name_labels] = float(value)
    return samples


def feedback_total(samples: dict) -> float:
    return sum(v for k, v in samples.items() if k.startswith("s1serve_feedback_total"))


def test_sweep_through_a_server_agrees_with_its_records_and_feeds_back(server, tmp_path):
    questions = load_task("arith", limit=4)
    cfg = SweepConfig(budgets=[4, 8, 16], min_think=6, max_waits=2, answer_tokens=32, concurrency=4)
    before = feedback_total(scrape(server))
    summary = run_sweep(questions, cfg, ServerBackend(server.grpc_address), tmp_path)
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(records) == 12 and feedback_total(scrape(server)) - before == 12
    scores = summary["methods"]["budget_forcing"]
    for point in scores["per_budget"]:
        runs = [r for r in records if r["budget"] == point["budget"]]
        assert point["runs"] == len(runs) == 4
        assert point["correct"] == sum(r["correct"] for r in runs)
        assert point["mean_think_tokens"] == sum(r["think_tokens"] for r in runs) / 4
        assert point["max_think_tokens"] <= point["budget"]
    in_range = [(r["min_think"] or 0) <= r["think_tokens"] <= r["budget"] for r in records]
    assert scores["control"] == sum(in_range) / 12
    assert png_size(tmp_path / "accuracy_vs_think_tokens.png") == (640, 480)
    assert png_size(tmp_path / "think_tokens_hist.png") == (640, 480)

    again = run_sweep(questions, SweepConfig(budgets=[4, 8, 16, 32], min_think=6, max_waits=2, answer_tokens=32),
                      ServerBackend(server.grpc_address), tmp_path, resume=True)
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(records) == 16 and again["methods"]["budget_forcing"]["runs"] == 16  # only budget 32 was new


def test_rejection_sampling_comparison(server, tmp_path):
    cfg = SweepConfig(budgets=[6, 12], answer_tokens=32, temperature=1.0, rejection_tries=3)
    summary = run_sweep(load_task("arith", limit=3), cfg, ServerBackend(server.grpc_address), tmp_path)
    assert set(summary["methods"]) == {"budget_forcing", "rejection_sampling"}
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    rejection = [r for r in records if r["method"] == "rejection_sampling"]
    assert len(rejection) == 6 and all(1 <= r["tries"] <= 3 for r in rejection)
    assert all(r["think_tokens"] <= r["budget"] or r["tries"] == 3 for r in rejection)


def test_eval_cli_runs_offline(llama_dir, tmp_path, capsys):
    code = main(["eval", "arith", "--model", str(llama_dir), "--budgets", "4,8", "--limit", "2",
                 "--answer-tokens", "32", "--out", str(tmp_path), "--num-kv-blocks", "64"])
    assert code == 0
    out = capsys.readouterr().out
    assert "budget_forcing: control" in out and (tmp_path / "summary.json").exists()


def test_dashboard_queries_only_metrics_the_server_exports(server):
    exported = {key.split("{")[0] for key in scrape(server)}
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(dashboard["panels"]) >= 6 and exprs
    functions = {"sum", "by", "rate", "increase", "histogram_quantile", "avg", "le", "phase", "think_bucket"}
    for expr in exprs:
        names = set(re.findall(r"\b([a-z_:][a-z0-9_:]*)\s*(?:\{|\[)", expr)) - functions
        assert names, expr
        assert names <= exported, f"{names - exported} not exported (query: {expr})"


EQUAL_COST = dict(budgets=[8, 16], answer_tokens=32, parallel=[1, 2, 4], parallel_max_think=8, parallel_temperature=1.0,
                  adaptive=[16, 32], adaptive_every=4, adaptive_agree=2, adaptive_probe_tokens=4)


def test_three_methods_at_equal_token_cost_on_both_backends(server, llama_dir, tmp_path):
    questions = load_task("arith", limit=3)
    summary = run_sweep(questions, SweepConfig(**EQUAL_COST), ServerBackend(server.grpc_address), tmp_path / "server")
    assert set(summary["methods"]) == {"budget_forcing", "parallel_vote", "adaptive"}
    for scores in summary["methods"].values():
        assert {"control", "scaling_per_1k_total_tokens", "performance"} <= set(scores)
    records = [json.loads(line) for line in (tmp_path / "server" / "results.jsonl").read_text().splitlines()]
    parallel = [r for r in records if r["method"] == "parallel_vote"]
    assert sorted(r["num_samples"] for r in parallel) == [1, 1, 1, 2, 2, 2, 4, 4, 4]
    assert all(r["vote_count"] >= 1 for r in parallel if r["num_samples"] > 1)
    by_n = {p["budget"]: p["mean_total_tokens"] for p in summary["methods"]["parallel_vote"]["per_budget"]}
    assert by_n[1] < by_n[2] < by_n[4]  # every sample's tokens count
    adaptive = [r for r in records if r["method"] == "adaptive"]
    assert len(adaptive) == 6 and all(r["think_tokens"] <= r["max_think"] for r in adaptive)
    assert all(r["total_tokens"] > r["think_tokens"] for r in adaptive)
    assert sum(r["probe_tokens"] for r in adaptive) > 0
    assert png_size(tmp_path / "server" / "accuracy_vs_total_tokens.png") == (640, 480)

    offline = run_sweep(questions, SweepConfig(**EQUAL_COST), OfflineBackend(str(llama_dir), num_kv_blocks=128, dtype="float32"),
                        tmp_path / "offline")
    fields = ("method", "budget", "question_id", "think_tokens", "total_tokens", "probe_tokens", "correct", "answer_text")
    local = [json.loads(line) for line in (tmp_path / "offline" / "results.jsonl").read_text().splitlines()]
    assert [tuple(r[f] for f in fields) for r in local] == [tuple(r[f] for f in fields) for r in records]
    assert offline["methods"]["parallel_vote"]["per_budget"] == summary["methods"]["parallel_vote"]["per_budget"]


def test_eval_cli_compares_the_three_methods(llama_dir, tmp_path, capsys):
    code = main(["eval", "arith", "--model", str(llama_dir), "--budgets", "4,8", "--limit", "2", "--answer-tokens", "32",
                 "--parallel", "1,2", "--adaptive", "8", "--adaptive-every", "4", "--out", str(tmp_path),
                 "--num-kv-blocks", "64"])
    assert code == 0
    out = capsys.readouterr().out
    assert "parallel_vote: control" in out and "adaptive: control" in out and "n      2" in out
    assert main(["eval", "arith", "--parallel", "2,x", "--out", str(tmp_path / "bad")]) == 2
