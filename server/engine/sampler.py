"""Turn the last-position logits of each sequence into one token id.

Greedy rows take the argmax. Other rows apply logit_bias, temperature, top-k and top-p, then draw
with the Gumbel/exponential trick from a generator seeded by (request seed, output position): a
request's draws depend on nothing else in the batch, and survive preemption unchanged.
"""

import torch

from .params import SamplingParams

_MASK64 = (1 << 64) - 1


def draw_seed(seed: int, position: int) -> int:
    """splitmix64 of (seed, position): independent-looking seeds for consecutive positions."""
    z = (seed + (position + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


class Sampler:
    def __call__(
        self, logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], positions: list[int]
    ) -> list[int]:
        """logits: (num_seqs, vocab). positions: each row's output index (seeds its draw)."""
        logits = logits.float()
        for row, p in enumerate(params):
            if p.logit_bias:
                ids = torch.tensor([t for t in p.logit_bias if t < logits.shape[1]], dtype=torch.long)
                bias = torch.tensor([b for t, b in p.logit_bias.items() if t < logits.shape[1]])
                logits[row].index_add_(0, ids.to(logits.device), bias.to(logits.device))
        tokens = logits.argmax(dim=-1).tolist()

        rows = [i for i, p in enumerate(params) if not p.greedy]
        if not rows:
            return tokens
        sub = logits[rows]  # (n, vocab)
        temps = torch.tensor([params[i].temperature for i in rows], device=sub.device)
        probs = self._filtered_probs(sub / temps[:, None], [params[i] for i in rows])
        for j, row in enumerate(rows):
            gen = torch.Generator(device=sub.device)
            gen.manual_seed(draw_seed(seeds[row], positions[row]))
            noise = torch.empty_like(probs[j]).exponential_(generator=gen)
            tokens[row] = int((probs[j] / noise).argmax())
        return tokens

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Softmax with top-k and top-p (nucleus) filtering; the top token always survives."""
        top_k = [p.top_k for p in params]
        top_p = [p.top_p for p in params]
        if all(k == 0 for k in top_k) and all(p == 1.0 for p in top_p):
            return logits.softmax(dim=-1)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        vocab = logits.shape[-1]
        k = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=logits.device)
        rank = torch.arange(vocab, device=logits.device)
        sorted_logits = sorted_logits.masked_fill(rank[None, :] >= k[:, None], float("-inf"))
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the mass of the tokens before it already reaches top_p.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        p = torch.tensor(top_p, device=logits.device)
        sorted_probs = sorted_probs.masked_fill(mass_before >= p[:, None], 0.0)
        probs = torch.zeros_like(sorted_probs).scatter_(-1, order, sorted_probs)
        return probs / probs.sum(dim=-1, keepdim=True)
