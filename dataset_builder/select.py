"""Stage 7: the paper's diversity sampler. Keep every trusted item; then, until the target size,
pick a domain uniformly among those with items left, pick a question in it with probability
proportional to 2^-rank of its trace length (rank 0 = the longest), and remove it. Seeded."""

import random
from dataclasses import dataclass


def select_indices(domains: list[str], lengths: list[int], trusted: list[bool], size: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    chosen = [i for i, t in enumerate(trusted) if t]
    pools: dict[str, list[int]] = {}
    for i, domain in enumerate(domains):
        if not trusted[i]:
            pools.setdefault(domain, []).append(i)
    for pool in pools.values():
        pool.sort(key=lambda i: (-lengths[i], i))  # longest first; ties in input order
    while len(chosen) < size and pools:
        domain = rng.choice(sorted(pools))
        pool = pools[domain]
        weights = [2.0 ** -rank for rank in range(len(pool))]
        chosen.append(pool.pop(rng.choices(range(len(pool)), weights)[0]))
        if not pool:
            del pools[domain]
    return chosen


@dataclass
class DiversitySelect:
    size: int = 1000
    seed: int = 0

    def __call__(self, data):
        usable = [i for i, error in enumerate(data["trace_error"]) if not error]
        data = data.select(usable)
        picked = select_indices(data["domain"], data["trace_tokens"], data["trusted"], self.size, self.seed)
        return data.select(picked)
