"""s1 in miniature, end to end on one CPU box: data -> SFT -> serve -> budget sweeps.

Runs the same commands a user runs, one after the other, and times them:
    1. the held-out evaluation set: the recipe's reasoning-gym generators with other seeds;
    2. `s1serve build-dataset dataset_builder/configs/recipe.yaml` (sources -> dedup ->
       decontamination against (1) -> quality -> difficulty (the default model) -> traces (the
       procedural teacher) -> domains -> select);
    3. `s1serve train trainer/configs/recipe.yaml` (SmolLM2-135M-Instruct, the s1 format);
    4. `s1serve serve --model <trained>`;
    5. `s1serve eval` through that server (with Feedback): a max_think sweep from well below to
       beyond the natural thinking length, min_think past it with max_waits 1, 2 and 4, and budget
       forcing against length rejection sampling at equal budgets (temperature 0.7).
Writes bench/results/recipe-*.json (every figure, the stage times) and copies the sweep plots
next to it. `--quick` shrinks everything (a tiny model directory, a few dozen problems, a few
steps) so CI can run the same path in a minute.

    python bench/recipe.py                       # the benchmark run (about an hour on 2 cores)
    python bench/recipe.py --work /tmp/recipe --eval-size 100
"""

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from results_io import RESULTS_DIR, result_path, write

ROOT = Path(__file__).resolve().parents[1]

DATA_CONFIG = ROOT / "dataset_builder" / "configs" / "recipe.yaml"
TRAIN_CONFIG = ROOT / "trainer" / "configs" / "recipe.yaml"
EVAL_SEED_OFFSET = 1000  # evaluation problems: the training generators' seeds + this


def s1serve(*args: str, log: Path) -> float:
    """Run one `s1serve` command (its output to `log`); returns its wall time, raises on failure."""
    start = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.call([sys.executable, "-m", "server.cli", *args], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    if code:
        raise SystemExit(f"s1serve {' '.join(args)} failed ({code}); see {log}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - start


def write_eval_set(sources: list[dict], size: int, path: Path) -> int:
    """`size` problems per training generator, from seeds the training set does not use."""
    from dataset_builder.reasoning_gym_source import rows

    records = []
    for source in sources:
        task = source["reasoning_gym"]
        for i, row in enumerate(rows(task, size, source["seed"] + EVAL_SEED_OFFSET, source.get("task_config"))):
            records.append({"id": f"{task}-{i}", "question": row["question"], "answer": row["answer"],
                            "grader": "reasoning_gym", "task": task, "metadata": row["metadata"]})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return len(records)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(http_port: int, server: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"s1serve serve exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit("s1serve serve did not become healthy")


def natural_end_share(results: Path, budget: int) -> float:
    """Share of the runs at `budget` whose thinking the model ended by itself (no cut)."""
    runs = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    runs = [r for r in runs if r["budget"] == budget and r["method"] == "budget_forcing"]
    return sum(not r["think_end_forced"] for r in runs) / max(1, len(runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default=str(ROOT / "recipe-work"), help="where data, model and sweeps go")
    parser.add_argument("--eval-size", type=int, default=100, help="held-out problems per generator")
    parser.add_argument("--budgets", default="8,16,24,32,48,64,128", help="max_think sweep, increasing")
    parser.add_argument("--rejection-budgets", default="16,32,64")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--quick", metavar="MODEL_DIR", help="CI size: this (tiny) student, a few problems and steps")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = parser.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    times, result = {}, {"args": vars(args)}
    out_path = result_path("recipe", args.out_dir, "quick" if args.quick else "cpu-smollm2-135m")

    data_config = yaml.safe_load(DATA_CONFIG.read_text())
    train_config = yaml.safe_load(TRAIN_CONFIG.read_text())
    eval_size = args.eval_size
    if args.quick:  # the same stages at CI size
        eval_size = min(eval_size, 8)
        for source in data_config["sources"]:
            source["size"] = 24
        data_config["difficulty"]["solvers"] = [{"engine": args.quick, "max_tokens": 8, "num_kv_blocks": 64}]
        data_config["traces"]["tokenizer"] = args.quick
        data_config["select"]["size"] = 16
        train_config.update(model=args.quick, max_steps=2, per_device_batch_size=4, global_batch_size=8, bf16=False)
        args.budgets, args.rejection_budgets = "4,8,16", "4,8"

    start = time.perf_counter()
    eval_path = work / "eval.jsonl"
    result["eval_questions"] = write_eval_set(data_config["sources"], eval_size, eval_path)
    times["eval_set"] = time.perf_counter() - start

    data_config.update(out=str(work / "data"), eval_sets=[{"path": str(eval_path)}])
    (work / "dataset.yaml").write_text(yaml.safe_dump(data_config))
    times["build_dataset"] = s1serve("build-dataset", str(work / "dataset.yaml"), log=work / "build-dataset.log")
    result["funnel"] = json.loads((work / "data" / "funnel.json").read_text())

    model_dir = work / "model"
    train_config.update(dataset=str(work / "data" / "dataset"), output_dir=str(model_dir))
    (work / "train.yaml").write_text(yaml.safe_dump(train_config))
    times["train"] = s1serve("train", str(work / "train.yaml"), log=work / "train.log")
    result["train"] = json.loads((model_dir / "train_results.json").read_text())

    grpc_port, http_port = free_port(), free_port()
    serve_args = ["serve", "--model", str(model_dir), "--host", "127.0.0.1", "--grpc-port", str(grpc_port),
                  "--http-port", str(http_port), "--max-waiting-requests", "4096"]
    with (work / "serve.log").open("w") as serve_log:
        server = subprocess.Popen([sys.executable, "-m", "server.cli", *serve_args], stdout=serve_log,
                                  stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        start = time.perf_counter()
        wait_healthy(http_port, server)
        times["serve_start"] = time.perf_counter() - start
        address = f"127.0.0.1:{grpc_port}"
        common = ["--server", address, "--concurrency", str(args.concurrency), "--answer-tokens", "64"]
        sweeps = {}

        def sweep(name: str, *flags: str) -> dict:
            out = work / "eval" / name
            times[f"eval_{name}"] = s1serve("eval", str(eval_path), *common, *flags, "--out", str(out),
                                           log=work / f"eval-{name}.log")
            sweeps[name] = json.loads((out / "summary.json").read_text())
            write(out_path, {**result, "times_s": times, "sweeps": sweeps})
            return sweeps[name]

        budgets = [int(b) for b in args.budgets.split(",")]
        max_sweep = sweep("max_think", "--budgets", args.budgets)
        largest = max_sweep["methods"]["budget_forcing"]["per_budget"][-1]
        result["natural_end_share_at_largest_budget"] = natural_end_share(work / "eval" / "max_think" / "results.jsonl", budgets[-1])
        natural = max(1, round(largest["mean_think_tokens"]))
        result["natural_think_tokens"] = natural
        # min_think beyond the natural length: the model's own end becomes a Wait, 1, 2 or 4 times.
        extend_to, ceiling = 2 * natural, 4 * natural
        for waits in (1, 2, 4):
            sweep(f"min_think_waits{waits}", "--budgets", str(ceiling), "--min-think", str(extend_to),
                  "--max-waits", str(waits))
        sweep("rejection", "--budgets", args.rejection_budgets, "--temperature", "0.7", "--compare-rejection", "4")
    finally:
        server.terminate()
        server.wait(timeout=60)

    times["total"] = sum(times.values())
    result.update(times_s=times, sweeps=sweeps)
    path = write(out_path, result)
    for name in ("max_think", "rejection"):
        for png in sorted((work / "eval" / name).glob("*.png")):
            shutil.copy(png, path.with_name(f"{path.stem}-{name}-{png.name}"))
    print(json.dumps({"times_s": times, "max_think": sweeps["max_think"]["methods"]["budget_forcing"]["per_budget"]}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
