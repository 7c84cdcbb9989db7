"""Turn the last-position logits of each sequence into one token id.

Every row gets logit_bias and the presence / frequency / repetition penalties. Greedy rows take
the argmax. Other rows apply temperature, min-p, top-k and top-p, then draw by inverse CDF with a
uniform derived from (request seed, output position): a request's draws depend on nothing else
in the batch, and survive preemption unchanged.
"""

import torch

from ..models.paged_attention import has_csrc_kernel
from .outputs import TokenLogprobs
from .params import SamplingParams
from .sequence import Sequence

_MASK64 = (1 << 64) - 1
Sample = tuple[int, TokenLogprobs | None]  # a row's token and, when its request asked, the logprobs


def draw_seed(seed: int, position: int) -> int:
    """splitmix64 of (seed, position): independent-looking seeds for consecutive positions."""
    z = (seed + (position + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def uniform(seed: int) -> float:
    """A float in [0, 1) from a 63-bit seed (its top 53 bits)."""
    return (seed >> 10) * 2.0**-53


def sample_seed(seed: int, index: int) -> int:
    """Sample `index` of a request with `n` samples: index 0 keeps the request's seed."""
    return seed if index == 0 else draw_seed(seed ^ 0x5EED5A3A1E5, index)


def first_maxima(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax (its first maximum): csrc's kernel on the CPU, which reads bf16 logits as
    they are (widening is exact, so the answer is the fp32 one) and is ~10x faster than torch's
    max over a 49k vocabulary; torch's max elsewhere."""
    if (logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.bfloat16) and logits.stride(-1) == 1
            and has_csrc_kernel("argmax_rows", "cpu")):
        out = torch.empty(logits.shape[0], dtype=torch.long)
        torch.ops.s1serve.argmax_rows(out, logits)
        return out
    return logits.max(dim=-1).indices  # the first maximum, like argmax, and 3x faster on the CPU


class Sampler:
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[Sample]:
        """logits: (num_seqs, vocab), one row per sequence. Returns each row's token and, when its
        request asked for them, the logprobs. A row's result depends on its own logits, params,
        tokens so far and seed (drawn per output position) only: never on the rest of the batch."""
        if all(seq.sampling.greedy and not seq.sampling.logit_bias and not seq.sampling.penalized
               and seq.sampling.logprobs is None for seq in seqs):  # nothing to adjust: the argmax as it is
            return [(t, None) for t in first_maxima(logits).tolist()]
        logits = logits.float()
        want_logprobs = [i for i, seq in enumerate(seqs) if seq.sampling.logprobs is not None]
        raw_logprobs = logits[want_logprobs].log_softmax(dim=-1) if want_logprobs else None
        for row, seq in enumerate(seqs):
            self._adjust(logits[row], seq)
        tokens = first_maxima(logits)

        rows = [i for i, seq in enumerate(seqs) if not seq.sampling.greedy]
        if rows:
            params = [seqs[i].sampling for i in rows]
            sub = logits[rows]  # (n, vocab)
            temps = torch.tensor([p.temperature for p in params], device=sub.device)
            probs = self._filtered_probs(sub / temps[:, None], params)
            # Inverse-CDF draws, one uniform per row from its own (seed, position): the whole batch
            # in one cumsum and one search, with no per-row generator or host sync.
            uniforms = [uniform(draw_seed(seqs[i].seed, seqs[i].num_output_tokens)) for i in rows]
            cdf = probs.cumsum(dim=-1)
            total = cdf[:, -1:]  # ~1; below it by an ulp, so rounding never lands past the last token with mass
            targets = torch.minimum(torch.tensor(uniforms, device=sub.device)[:, None] * total, total * (1 - 2**-23))
            drawn = torch.searchsorted(cdf, targets, right=True).clamp_(max=cdf.shape[-1] - 1)
            tokens[rows] = drawn[:, 0]
        tokens = tokens.tolist()  # the step's one host transfer

        results: list[Sample] = [(t, None) for t in tokens]
        for j, row in enumerate(want_logprobs):
            results[row] = (tokens[row], _logprobs(raw_logprobs[j], tokens[row], seqs[row].sampling.logprobs))
        return results

    @staticmethod
    def _adjust(row: torch.Tensor, seq: Sequence) -> None:
        """logit_bias and the penalties, in place on one row of logits."""
        p = seq.sampling
        vocab = row.shape[0]
        if p.logit_bias:
            ids = torch.tensor([t for t in p.logit_bias if t < vocab], dtype=torch.long, device=row.device)
            bias = torch.tensor([b for t, b in p.logit_bias.items() if t < vocab], device=row.device)
            row.index_add_(0, ids, bias)
        if not p.penalized:
            return
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted({t for t in seq.token_ids if t < vocab}), dtype=torch.long, device=row.device)
            values = row[seen]
            row[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        output = [t for t in seq.token_ids[seq.num_prompt_tokens :] if t < vocab]
        if output and (p.presence_penalty or p.frequency_penalty):
            ids, counts = torch.tensor(output, dtype=torch.long, device=row.device).unique(return_counts=True)
            row.index_add_(0, ids, -(p.frequency_penalty * counts.float() + p.presence_penalty))

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Softmax with min-p, top-k and top-p (nucleus) filtering; the top token always survives."""
        if any(p.min_p > 0 for p in params):
            probs = logits.softmax(dim=-1)
            floor = torch.tensor([p.min_p for p in params], device=logits.device)[:, None] * probs.max(dim=-1, keepdim=True).values
            logits = logits.masked_fill(probs < floor, float("-inf"))
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


def _logprobs(row: torch.Tensor, token: int, k: int) -> TokenLogprobs:
    top = row.topk(k) if k else None
    return TokenLogprobs(float(row[token]), list(zip(top.indices.tolist(), top.values.tolist())) if top else [])
