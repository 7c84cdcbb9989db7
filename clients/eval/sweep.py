"""Budget sweeps: every question at every thinking budget, graded, scored, plotted.

Backends: the offline engine (`LLM` on a model directory; each budget is one continuous batch) or
a running server over gRPC (`S1Client`, `concurrency` requests in flight; every graded outcome
is sent back through `Feedback`, so the server's accuracy-by-think-tokens metrics fill up).
Results go to `OUT/results.jsonl` (one line per run, appended as runs finish, so `resume` can
skip finished (question, budget, sample, method) keys), `OUT/summary.json` and PNG plots.
"""

import asyncio
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from ..errors import TaskError
from .graders import get_grader
from .metrics import summarize
from .tasks import Question

BUDGET_FORCING, REJECTION = "budget_forcing", "rejection_sampling"


@dataclass
class SweepConfig:
    budgets: list[int]
    min_think: int | None = None  # also requested at every budget (capped at the budget)
    max_waits: int | None = None
    samples: int = 1
    temperature: float = 0.0
    seed: int = 0
    answer_tokens: int = 512  # generation room after thinking (the forced end included)
    rejection_tries: int = 0  # > 0: also run length rejection sampling with up to this many tries
    concurrency: int = 16

    def __post_init__(self):
        if not self.budgets or any(b <= 0 for b in self.budgets):
            raise TaskError("budgets must be positive integers")
        if any(b2 <= b1 for b1, b2 in zip(self.budgets, self.budgets[1:])):
            raise TaskError(f"budgets must be strictly increasing, got {self.budgets}")
        if self.samples < 1:
            raise TaskError("samples must be >= 1")
        if self.rejection_tries and self.temperature == 0:
            raise TaskError("rejection sampling needs temperature > 0 (greedy retries are identical)")


@dataclass
class Run:
    """One request to make: the same shape for both backends."""

    question: Question
    budget: int
    sample: int
    method: str
    min_think: int | None
    max_think: int | None
    max_tokens: int
    seed: int

    @property
    def key(self) -> tuple:
        return (self.question.id, self.budget, self.sample, self.method)


class OfflineBackend:
    def __init__(self, model_dir: str, **engine_config):
        from server.engine import LLM

        self.llm = LLM(model_dir, **engine_config)

    def generate(self, runs: list[Run], cfg: SweepConfig) -> list[dict]:
        from server.engine import SamplingParams, ThinkBudget

        conversations = [[{"role": "user", "content": r.question.question}] for r in runs]
        sampling = [SamplingParams(temperature=cfg.temperature, max_tokens=r.max_tokens, seed=r.seed) for r in runs]
        budgets = [ThinkBudget(min_think=r.min_think, max_think=r.max_think, max_waits=cfg.max_waits) for r in runs]
        outs = self.llm.chat(conversations, sampling, budgets, progress=f"eval: {len(runs)} runs")
        return [dict(request_id=o.request_id, think_tokens=o.think_tokens, answer_tokens=o.answer_tokens,
                     num_waits=o.num_waits, think_end_forced=o.think_end_forced, finish_reason=o.finish_reason,
                     answer_text=o.answer_text) for o in outs]

    def feedback(self, graded: list[tuple[str, bool]]) -> None:
        pass  # no server to tell


class ServerBackend:
    def __init__(self, address: str, api_key: str | None = None):
        self.address, self.api_key = address, api_key

    def generate(self, runs: list[Run], cfg: SweepConfig) -> list[dict]:
        from ..client import AsyncS1Client

        async def main():
            gate = asyncio.Semaphore(cfg.concurrency)
            bar = tqdm(total=len(runs), desc=f"eval: {len(runs)} runs", unit="req", dynamic_ncols=True)
            async with AsyncS1Client(self.address, api_key=self.api_key) as client:
                async def one(r: Run) -> dict:
                    async with gate:
                        done = await client.generate(
                            messages=[{"role": "user", "content": r.question.question}], max_tokens=r.max_tokens,
                            temperature=cfg.temperature, seed=r.seed, min_think=r.min_think, max_think=r.max_think,
                            max_waits=cfg.max_waits, budget=True,
                        )
                    bar.update()
                    u = done.usage
                    return dict(request_id=done.request_id, think_tokens=u.think_tokens, answer_tokens=u.answer_tokens,
                                num_waits=u.num_waits, think_end_forced=u.think_end_forced,
                                finish_reason=u.finish_reason, answer_text=done.answer_text)

                try:
                    return await asyncio.gather(*(one(r) for r in runs))
                finally:
                    bar.close()

        return asyncio.run(main())

    def feedback(self, graded: list[tuple[str, bool]]) -> None:
        from ..client import S1Client

        with S1Client(self.address, api_key=self.api_key) as client:
            for request_id, correct in graded:
                client.feedback(request_id, correct)


def _load_done(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_sweep(questions: list[Question], cfg: SweepConfig, backend, out_dir: Path, resume: bool = False) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / "results.jsonl"
    done = _load_done(results_path) if resume else []
    if not resume:
        results_path.write_text("")
    finished = {(r["question_id"], r["budget"], r["sample"], r["method"]) for r in done}

    def write(runs: list[Run], replies: list[dict], tries: list[int] | None = None) -> list[dict]:
        records, graded = [], []
        for i, (run, reply) in enumerate(zip(runs, replies)):
            correct = get_grader(run.question.grader)(reply["answer_text"], run.question.answer, run.question.record)
            records.append({"question_id": run.question.id, "budget": run.budget, "sample": run.sample,
                            "method": run.method, "min_think": run.min_think, "max_think": run.budget,
                            "correct": correct, "reference": run.question.answer,
                            "tries": tries[i] if tries else 1, **reply})
            graded.append((reply["request_id"], correct))
        backend.feedback(graded)
        with results_path.open("a") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
        return records

    for budget in cfg.budgets:
        lo = min(cfg.min_think, budget) if cfg.min_think else None
        runs = [Run(q, budget, s, BUDGET_FORCING, lo, budget, budget + cfg.answer_tokens, cfg.seed + 1000 * s)
                for q in questions for s in range(cfg.samples)]
        runs = [r for r in runs if r.key not in finished]
        if runs:
            done += write(runs, backend.generate(runs, cfg))
        if cfg.rejection_tries:
            done += _rejection(questions, budget, cfg, backend, finished, write)

    summary = {"config": asdict(cfg), "num_questions": len(questions), "methods": summarize(done)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    from .plots import plot_sweep

    plot_sweep(done, summary, out_dir)
    return summary


def _rejection(questions, budget, cfg, backend, finished, write) -> list[dict]:
    """Length rejection sampling: sample with unconstrained thinking until it stays within the
    budget, up to `rejection_tries` tries; a question that never does keeps its last try."""
    pending = [Run(q, budget, s, REJECTION, None, None, 2 * budget + cfg.answer_tokens, cfg.seed + 1000 * s)
               for q in questions for s in range(cfg.samples)]
    pending = [r for r in pending if r.key not in finished]
    accepted: list[tuple[Run, dict, int]] = []
    for attempt in range(cfg.rejection_tries):
        if not pending:
            break
        for r in pending:
            r.seed += 7919 * attempt  # a fresh draw each try
        replies = backend.generate(pending, cfg)
        last = attempt == cfg.rejection_tries - 1
        still = []
        for run, reply in zip(pending, replies):
            if reply["think_tokens"] <= budget or last:
                accepted.append((run, reply, attempt + 1))
            else:
                still.append(run)
        pending = still
    if not accepted:
        return []
    runs, replies, tries = zip(*accepted)
    return write(list(runs), list(replies), list(tries))
