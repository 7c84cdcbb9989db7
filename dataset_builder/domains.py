"""Stage 6: each question's MSC 2020 top-level area (the code list ships in `msc.py`), by an LLM
classifier through the backend interface, or by the deterministic keyword classifier offline (also
the fallback when the model's reply names no valid code)."""

import re
from dataclasses import dataclass, field

from .msc import MSC2020, keyword_domain

CLASSIFY_PROMPT = (
    "Classify the problem into one top-level area of the Mathematics Subject Classification 2020.\n"
    "Areas:\n{areas}\n\nProblem:\n{question}\n\nReply with the two-digit code only."
)
CODE = re.compile(r"\b(\d{2})\b")


@dataclass
class DomainClassifier:
    backend: object | None = None  # None: keywords only
    batch_size: int = 64
    fallbacks: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def classify(self, questions: list[str]) -> list[str]:
        if self.backend is None:
            return [keyword_domain(q) for q in questions]
        areas = "\n".join(f"{code} {name}" for code, name in MSC2020.items())
        codes = []
        for start in range(0, len(questions), self.batch_size):
            chunk = questions[start : start + self.batch_size]
            replies = self.backend.chat([[{"role": "user", "content": CLASSIFY_PROMPT.format(areas=areas, question=q)}] for q in chunk],
                                        progress=f"domains, {self.backend.name}: {start + len(chunk)}/{len(questions)}")
            for question, reply in zip(chunk, replies):
                found = [c for c in CODE.findall(reply.content) if c in MSC2020]
                if not found:
                    self.fallbacks += 1
                codes.append(found[0] if found else keyword_domain(question))
        return codes

    def __call__(self, data):
        codes = self.classify(data["question"])
        self.counts = {code: codes.count(code) for code in sorted(set(codes))}
        return data.add_column("domain", codes)
