"""Each curation stage on small data with known outcomes."""

import json
import random
from collections import Counter

import datasets
import pytest

from dataset_builder.backends import EndpointBackend, Reply
from dataset_builder.dedup import Decontaminate, DedupConfig, Deduplicate, EvalSet
from dataset_builder.difficulty import DifficultyFilter
from dataset_builder.quality import RULES, QualityFilter, failed_rules
from dataset_builder.sample import DEFECTS
from dataset_builder.select import select_indices

LONG = ("A train leaves the station at {h} o'clock travelling at {v} kilometres per hour towards a town that lies "
        "{d} kilometres away along a straight track. At what time does it arrive at the town?")


def table(questions: list[str], **columns) -> datasets.Dataset:
    n = len(questions)
    return datasets.Dataset.from_dict({
        "question": questions, "solution": columns.get("solution", ["s"] * n), "answer": columns.get("answer", ["1"] * n),
        "source_type": columns.get("source_type", ["src"] * n), "metadata": ["{}"] * n,
        "trusted": columns.get("trusted", [False] * n),
    })


def test_exact_and_near_duplicates_are_dropped_and_near_misses_kept():
    base = LONG.format(h=9, v=80, d=240)
    questions = [
        base,
        "  " + base.upper().replace(" ", "   ").rstrip("?"),  # exact after normalization
        "Problem 4: " + base,  # near duplicate: a scraped label
        LONG.format(h=9, v=80, d=320),  # near miss: another distance is another problem
        LONG.format(h=7, v=60, d=300),  # near miss
        "What is the derivative of x^3 with respect to x at the point x = 2?",
    ]
    stage = Deduplicate(DedupConfig())
    kept = stage(table(questions))
    assert kept["question"] == [questions[0], questions[3], questions[4], questions[5]]
    reasons = {d.index: d.reason for d in stage.dropped}
    assert reasons == {1: "exact_duplicate", 2: "near_duplicate"}
    assert all(d.collided_with.startswith("row 0") for d in stage.dropped)


def test_near_dedup_threshold_is_a_real_knob():
    questions = [LONG.format(h=9, v=80, d=240), LONG.format(h=9, v=80, d=320)]
    assert len(Deduplicate(DedupConfig(near_duplicate_threshold=0.7))(table(questions))) == 1
    assert len(Deduplicate(DedupConfig(near_duplicate_threshold=0.0))(table(questions))) == 2


def test_decontamination_reports_the_eval_item_and_spares_short_overlaps(tmp_path):
    eval_file = tmp_path / "eval.jsonl"
    eval_items = ["Find the number of positive divisors of 2024 that are perfect squares of integers.",
                  "How many trailing zeros does 100 factorial have when written in base ten?"]
    eval_file.write_text("".join(json.dumps({"problem": q}) + "\n" for q in eval_items))
    questions = [
        "Please find the number of positive divisors of 2024 that are perfect squares of integers, then add one.",
        "How many trailing zeros does 100 factorial show?",  # 7 shared words in a row: below the 8-gram
        "Count the lattice points inside a circle of radius 5 centred at the origin.",
    ]
    stage = Decontaminate([EvalSet(str(eval_file), "problem")], n=8)
    kept = stage(table(questions))
    assert kept["question"] == questions[1:]
    [dropped] = stage.dropped
    assert dropped.index == 0 and dropped.reason == "eval_overlap"
    assert dropped.collided_with.startswith(f"{eval_file}#0: Find the number of positive divisors")


@pytest.mark.parametrize("question, solution, answer, rule", DEFECTS, ids=[d[3] for d in DEFECTS])
def test_each_quality_rule_fires_on_its_case(question, solution, answer, rule):
    assert rule in failed_rules({"question": question, "solution": solution, "answer": answer})


def test_clean_questions_pass_every_rule_and_counts_add_up():
    clean = {"question": "1. Find the sum of 3 and 4.\n2. Find their product.", "solution": "7 and 12.", "answer": "7"}
    assert failed_rules(clean) == []
    assert failed_rules({**clean, "question": "Using the figure below: [asy] draw((0,0)--(1,1)); [/asy] find the slope."}) == []
    defects = [d for d in DEFECTS]
    data = table([d[0] for d in defects] + [clean["question"]], solution=[d[1] for d in defects] + [clean["solution"]],
                 answer=[d[2] for d in defects] + [clean["answer"]], source_type=["a"] * len(defects) + ["trusted-src"])
    stage = QualityFilter(trusted_sources=["trusted-src"])
    kept = stage(data)
    assert kept["question"] == [clean["question"]] and kept["trusted"] == [True]
    assert set(stage.rule_counts) == set(RULES) and all(stage.rule_counts[d[3]] >= 1 for d in defects)


class ScriptedSolver:
    """An external model that knows some answers (stands in for an endpoint; our stage is real)."""

    def __init__(self, name: str, answers: dict[str, str]):
        self.name, self.answers, self.asked = name, answers, []

    def chat(self, conversations, progress=None):
        replies = []
        for messages in conversations:
            question = messages[-1]["content"].split("\n\nPut your final answer", 1)[0]
            self.asked.append(question)
            replies.append(Reply(content=f"The answer is \\boxed{{{self.answers.get(question, '0')}}}."))
        return replies


def test_a_question_any_solver_answers_correctly_is_dropped():
    questions = ["What is one half plus one quarter?", "What is 6 times 7?", "What is 2 to the tenth power?", "A hard one?", "Trusted one?"]
    data = table(questions, answer=["\\frac{3}{4}", "42", "1024", "17", "5"], trusted=[False] * 4 + [True])
    first = ScriptedSolver("a", {questions[0]: "0.75"})  # symbolic equivalence: 0.75 == 3/4
    second = ScriptedSolver("b", {questions[1]: "42", questions[2]: "1000"})
    stage = DifficultyFilter([first, second])
    kept = stage(data)
    assert kept["question"] == questions[2:]
    assert stage.solved == {"a": 1, "b": 1}
    assert questions[0] not in second.asked and questions[4] not in first.asked  # solved or trusted: not asked again


def test_selection_is_seeded_balances_domains_and_prefers_long_traces():
    rng = random.Random(0)
    domains = ["11"] * 60 + ["05"] * 30 + ["51"] * 10
    lengths = [rng.randint(100, 10_000) for _ in domains]
    trusted = [i in (3, 70) for i in range(len(domains))]
    first = select_indices(domains, lengths, trusted, size=30, seed=7)
    assert first == select_indices(domains, lengths, trusted, size=30, seed=7)
    assert first != select_indices(domains, lengths, trusted, size=30, seed=8)
    assert first[:2] == [3, 70] and len(set(first)) == 30
    per_domain, longest_picked, trials = Counter(), 0, 400
    for seed in range(trials):
        picked = select_indices(domains, lengths, [False] * len(domains), size=15, seed=seed)
        per_domain.update(domains[i] for i in picked)
        longest_in_11 = max((i for i in range(60)), key=lambda i: lengths[i])
        longest_picked += longest_in_11 in picked
    # Uniform over domains (5 each per draw of 15), not proportional to their sizes (9 / 4.5 / 1.5).
    for domain in ("11", "05", "51"):
        assert per_domain[domain] / trials == pytest.approx(5, abs=0.6)
    # Weight 2^-rank: the longest trace of a domain is drawn in its first pick half of the time.
    assert longest_picked / trials > 0.8


def test_endpoint_backend_reads_reasoning_from_a_running_s1serve(server):
    backend = EndpointBackend(server.http_url + "/v1", model="llama0", max_tokens=32, max_think=6)
    [reply] = backend.chat([[{"role": "user", "content": "What is 2+3?"}]])
    assert not reply.error and reply.reasoning  # think phase as reasoning_content, answer as content
    bad = EndpointBackend("http://127.0.0.1:9/v1", model="x", retries=1, timeout_s=2)
    [failed] = bad.chat([[{"role": "user", "content": "hi"}]])
    assert failed.error and not failed.content


class ScriptedChat:
    """An external model with one fixed reply (stands in for an endpoint)."""

    def __init__(self, reply: str):
        self.name, self.reply, self.prompts = "scripted", reply, []

    def chat(self, conversations, progress=None):
        self.prompts += [messages[-1]["content"] for messages in conversations]
        return [Reply(content=self.reply) for _ in conversations]


def test_llm_judge_grades_with_the_reference_in_its_prompt():
    from dataset_builder.difficulty import LLMJudge

    yes, no = ScriptedChat("YES, same answer."), ScriptedChat("NO")
    assert LLMJudge(yes)("What is 6 times 7?", "so \\boxed{42}", "42")
    assert not LLMJudge(no)("What is 6 times 7?", "so \\boxed{41}", "42")
    assert "Reference answer:\n42" in yes.prompts[0] and "Attempt:\n42" in yes.prompts[0]


def test_llm_domain_classifier_takes_valid_codes_and_falls_back_to_keywords():
    from dataset_builder.domains import DomainClassifier

    data = table(["How many ways can 5 books be arranged?", "Find the remainder of 2^10 modulo 7."])
    assert DomainClassifier(ScriptedChat("05"))(data)["domain"] == ["05", "05"]
    confused = DomainClassifier(ScriptedChat("I think it is area 99."))
    assert confused(data)["domain"] == ["05", "11"] and confused.fallbacks == 2  # 99 is no MSC code
    assert DomainClassifier(None)(data)["domain"] == ["05", "11"]
