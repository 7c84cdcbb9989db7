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

from server.answers import Vote, majority, same

from ..errors import TaskError
from .graders import get_grader
from .metrics import summarize
from .tasks import Question

BUDGET_FORCING, REJECTION = "budget_forcing", "rejection_sampling"
PARALLEL, ADAPTIVE = "parallel_vote", "adaptive"
# How a vote reads answers for each grader (server.answers methods).
VOTE_METHOD = {"math": "math", "multiple_choice": "multiple_choice", "exact": "exact", "normalized": "normalized",
               "reasoning_gym": "normalized", "code": "exact"}


def vote_method(question: Question) -> str:
    return VOTE_METHOD.get(question.grader, "exact")


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
    # Parallel scaling: for each n, n samples per question (one request, shared prompt KV) at
    # `parallel_max_think` (default: the first budget) and `parallel_temperature`, majority vote.
    parallel: list[int] | None = None
    parallel_max_think: int | None = None
    parallel_temperature: float = 0.7
    # Adaptive thinking: for each max_think cap, thinking that stops once `adaptive_agree` probes
    # (every `adaptive_every` tokens, `adaptive_probe_tokens` long) agree.
    adaptive: list[int] | None = None
    adaptive_every: int = 64
    adaptive_agree: int = 3
    adaptive_probe_tokens: int = 24

    def __post_init__(self):
        if not self.budgets or any(b <= 0 for b in self.budgets):
            raise TaskError("budgets must be positive integers")
        if any(b2 <= b1 for b1, b2 in zip(self.budgets, self.budgets[1:])):
            raise TaskError(f"budgets must be strictly increasing, got {self.budgets}")
        if self.samples < 1:
            raise TaskError("samples must be >= 1")
        if self.rejection_tries and self.temperature == 0:
            raise TaskError("rejection sampling needs temperature > 0 (greedy retries are identical)")
        for name in ("parallel", "adaptive"):
            values = getattr(self, name) or []
            if any(v <= 0 for v in values) or any(b <= a for a, b in zip(values, values[1:])):
                raise TaskError(f"{name} must be strictly increasing positive integers, got {values}")
        if self.parallel and self.parallel_temperature <= 0:
            raise TaskError("parallel sampling needs parallel_temperature > 0 (greedy samples are identical)")


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
    n: int = 1  # samples (parallel_vote)
    temperature: float | None = None  # None: the sweep's
    adaptive: dict | None = None  # AdaptiveThinking fields (adaptive)

    @property
    def key(self) -> tuple:
        return (self.question.id, self.budget, self.sample, self.method)


class OfflineBackend:
    def __init__(self, model_dir: str, **engine_config):
        from server.engine import LLM

        self.llm = LLM(model_dir, **engine_config)

    def generate(self, runs: list[Run], cfg: SweepConfig) -> list[dict]:
        from server.engine import AdaptiveThinking, SamplingParams, ThinkBudget

        conversations = [[{"role": "user", "content": r.question.question}] for r in runs]
        sampling = [SamplingParams(temperature=cfg.temperature if r.temperature is None else r.temperature,
                                   max_tokens=r.max_tokens, seed=r.seed, n=r.n) for r in runs]
        budgets = [ThinkBudget(min_think=r.min_think, max_think=r.max_think, max_waits=cfg.max_waits,
                               adaptive=AdaptiveThinking(**r.adaptive) if r.adaptive else None) for r in runs]
        outs = self.llm.chat(conversations, sampling, budgets, progress=f"eval: {len(runs)} runs")
        replies = []
        for run, o in zip(runs, outs):
            samples = o.samples or [o]
            texts = [s.answer_text for s in samples]
            vote = majority(texts, vote_method(run.question)) if run.n > 1 else None
            replies.append(_reply(o.request_id, [dict(think_tokens=s.think_tokens, answer_tokens=s.answer_tokens,
                                                      num_waits=s.num_waits, think_end_forced=s.think_end_forced,
                                                      finish_reason=s.finish_reason, completion_tokens=len(s.token_ids),
                                                      probe_tokens=s.probe_tokens, converged=s.converged)
                                                 for s in samples], texts, vote))
        return replies

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
                            temperature=cfg.temperature if r.temperature is None else r.temperature, seed=r.seed,
                            min_think=r.min_think, max_think=r.max_think, max_waits=cfg.max_waits, budget=True,
                            n=r.n if r.n > 1 else None, adaptive=r.adaptive,
                            vote=vote_method(r.question) if r.n > 1 else None,  # the server votes
                        )
                    bar.update()
                    samples = done.samples or [done]
                    return _reply(done.request_id, [
                        dict(think_tokens=s.usage.think_tokens, answer_tokens=s.usage.answer_tokens,
                             num_waits=s.usage.num_waits, think_end_forced=s.usage.think_end_forced,
                             finish_reason=s.usage.finish_reason, completion_tokens=s.usage.completion_tokens,
                             probe_tokens=s.usage.probe_tokens, converged=bool(s.usage.think_converged))
                        for s in samples], [s.answer_text for s in samples], done.vote)

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


def _reply(request_id: str, samples: list[dict], texts: list[str], vote: Vote | None) -> dict:
    """One run's record fields. A voted run is graded on the text of the first sample that gave the
    majority answer; its thinking is the longest sample's (what Control checks against the budget);
    `total_tokens` is everything the run generated: every sample's tokens and every probe's."""
    pick = 0
    if vote is not None and vote.answer:
        pick = next((i for i, a in enumerate(vote.answers) if a and same(a, vote.answer, vote.method)), 0)
    first = samples[pick]
    record = dict(request_id=request_id, think_tokens=max(s["think_tokens"] for s in samples),
                  answer_tokens=first["answer_tokens"], num_waits=first["num_waits"],
                  think_end_forced=first["think_end_forced"], finish_reason=first["finish_reason"],
                  answer_text=texts[pick], num_samples=len(samples),
                  probe_tokens=sum(s["probe_tokens"] for s in samples),
                  converged=sum(bool(s["converged"]) for s in samples),
                  total_tokens=sum(s["completion_tokens"] + s["probe_tokens"] for s in samples))
    if vote is not None:
        record.update(vote_answer=vote.answer, vote_count=vote.count)
    return record


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
                            "method": run.method, "min_think": run.min_think,
                            "max_think": run.max_think if run.method == PARALLEL else run.budget,
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

    # Parallel scaling at one thinking budget: the point is n (its `budget` field holds n).
    parallel_think = cfg.parallel_max_think or cfg.budgets[0]
    for n in cfg.parallel or []:
        runs = [Run(q, n, 0, PARALLEL, None, parallel_think, parallel_think + cfg.answer_tokens, cfg.seed, n=n,
                    temperature=cfg.parallel_temperature) for q in questions]
        runs = [r for r in runs if r.key not in finished]
        if runs:
            done += write(runs, backend.generate(runs, cfg))
    adaptive = dict(every=cfg.adaptive_every, agree=cfg.adaptive_agree, probe_tokens=cfg.adaptive_probe_tokens)
    for cap in cfg.adaptive or []:
        runs = [Run(q, cap, s, ADAPTIVE, None, cap, cap + cfg.answer_tokens, cfg.seed + 1000 * s,
                    adaptive={**adaptive, "method": vote_method(q)})
                for q in questions for s in range(cfg.samples)]
        runs = [r for r in runs if r.key not in finished]
        if runs:
            done += write(runs, backend.generate(runs, cfg))

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
