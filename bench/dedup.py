"""Throughput of the CPU curation stages (dedup + decontamination) with num_proc 1 and 2.

50k generated questions (with planted exact and near duplicates and eval copies) against a 1k
eval set; the same data through both settings in one invocation; questions/s and the speed-up.

    python bench/dedup.py [--questions 50000] [--eval 1000]
"""

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results_io import save  # noqa: E402

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "qu", "ri", "do", "fe", "gu", "hi"]


def vocabulary(n: int, rng: random.Random) -> list[str]:
    return list({"".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(n * 2)})[:n]


def generate(num_questions: int, num_eval: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    words = vocabulary(5000, rng)

    def sentence() -> str:
        text = " ".join(rng.choices(words, k=rng.randint(12, 60)))
        return f"{text} {rng.randint(1, 10**6)}?"

    questions = [sentence() for _ in range(num_questions)]
    eval_set = [sentence() for _ in range(num_eval)]
    for i in rng.sample(range(num_questions), num_questions // 50):  # 2% exact duplicates
        questions[i] = questions[rng.randrange(num_questions)].upper()
    for i in rng.sample(range(num_questions), num_questions // 50):  # 2% near duplicates
        questions[i] = "Problem: " + questions[rng.randrange(num_questions)]
    for i in rng.sample(range(num_questions), num_questions // 100):  # 1% eval copies
        questions[i] = rng.choice(eval_set)
    return questions, eval_set


def run(questions: list[str], eval_file: Path, num_proc: int | None) -> dict:
    import datasets

    from dataset_builder.dedup import Decontaminate, Deduplicate, EvalSet

    data = datasets.Dataset.from_dict({"question": questions, "source_type": ["bench"] * len(questions)})
    started = time.perf_counter()
    dedup = Deduplicate(num_proc=num_proc)
    deduped = dedup(data)
    middle = time.perf_counter()
    decon = Decontaminate([EvalSet(str(eval_file))], num_proc=num_proc)
    kept = decon(deduped)
    done = time.perf_counter()
    return {"num_proc": num_proc or 1, "dedup_s": middle - started, "decontaminate_s": done - middle, "total_s": done - started,
            "questions_per_s": len(questions) / (done - started), "dropped_duplicates": len(dedup.dropped),
            "dropped_eval_overlap": len(decon.dropped), "kept": len(kept)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=50_000)
    parser.add_argument("--eval", type=int, default=1000)
    args = parser.parse_args()
    import json
    import tempfile

    import datasets

    datasets.disable_caching()  # measure the work, not a cache hit from the previous setting
    questions, eval_set = generate(args.questions, args.eval)
    with tempfile.TemporaryDirectory() as tmp:
        eval_file = Path(tmp) / "eval.jsonl"
        eval_file.write_text("".join(json.dumps({"question": q}) + "\n" for q in eval_set))
        results = [run(questions, eval_file, num_proc) for num_proc in (None, 2)]
    for r in results:
        print(f"num_proc {r['num_proc']}: {r['questions_per_s']:.0f} questions/s (dedup {r['dedup_s']:.1f} s, "
              f"decontaminate {r['decontaminate_s']:.1f} s); dropped {r['dropped_duplicates']} duplicates, "
              f"{r['dropped_eval_overlap']} eval overlaps")
    speedup = results[1]["questions_per_s"] / results[0]["questions_per_s"]
    print(f"speed-up with num_proc 2: {speedup:.2f}x")
    print(f"wrote {save('dedup', {'questions': args.questions, 'eval': args.eval, 'runs': results, 'speedup_num_proc_2': speedup})}")


if __name__ == "__main__":
    main()
