"""The slow reference for budget forcing: the s1 repository's loop, at the token level, on
Hugging Face transformers.

s1's procedure (simplescaling/s1, README "Budget forcing"): generate until the end-of-thinking
delimiter (or EOS) with at most the remaining thinking budget; if thinking is still too short,
append "Wait" to the prompt and generate again with what is left of the budget; finally force the
delimiter and the answer prefix and generate the answer. Every call re-prefills the whole prompt,
which is exactly what the engine's in-loop version avoids. Differences from the s1 script, all
from DESIGN.md: inserted Wait tokens count as thinking; a model that ends thinking with its own
delimiter gets the delimiter completed (no answer prefix) and then answers, one that stops at EOS
(where s1 stops too) gets the forced end (delimiter and answer prefix); `max_tokens` bounds all generated tokens and thinking is cut early enough that the
forced end and a minimum answer fit in it.
"""

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from server.engine import ThinkBudget
from server.engine.think import ThinkTokens


class AddBias(LogitsProcessor):
    """OpenAI-style logit_bias, as the engine applies it (fp32, before argmax)."""

    def __init__(self, bias: dict[int, float]):
        self.bias = bias

    def __call__(self, input_ids, scores):
        scores = scores.float()
        for token, b in self.bias.items():
            scores[:, token] += b
        return scores


def greedy_until(model, ids: list[int], max_new: int, stop: set[int], bias: dict[int, float]) -> tuple[list[int], int | None]:
    """Greedy tokens after `ids` until a token in `stop` (returned separately, not in the list)."""
    if max_new <= 0:
        return [], None
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False,
            eos_token_id=sorted(stop), pad_token_id=min(stop), logits_processor=LogitsProcessorList([AddBias(bias)]),
        )
    new = out[0, len(ids) :].tolist()
    if new and new[-1] in stop:
        return new[:-1], new[-1]
    return new, None


def s1_reference(
    model, prompt: list[int], think: ThinkTokens, budget: ThinkBudget, wait: tuple[int, ...],
    max_tokens: int, eos: set[int], bias: dict[int, float], min_answer: int,
) -> dict:
    forced_end = list(think.think_end) + list(think.answer_prefix)
    # Thinking is cut at max_think, or earlier so that the forced end and `min_answer` answer
    # tokens fit in max_tokens (the engine refuses budgets that cannot leave that room).
    limit = min(budget.max_think or max_tokens, max_tokens - len(forced_end) - min_answer)
    out: list[int] = []
    num_think = num_waits = 0
    forced = False
    stop = {think.think_end[0], *eos}
    while True:  # the think phase, one generate() call per segment between Waits
        tokens, stopped_at = greedy_until(model, prompt + out, limit - num_think, stop, bias)
        out += tokens
        num_think += len(tokens)
        if stopped_at is None:  # the thinking budget ran out: force the end
            forced = True
            out += forced_end
            break
        may_wait = budget.min_think and num_think < budget.min_think and not (
            budget.max_waits and num_waits >= budget.max_waits
        )
        if may_wait:
            w = list(wait[: limit - num_think])
            out += w
            num_think += len(w)
            num_waits += 1
            if num_think >= limit:
                forced = True
                out += forced_end
                break
            continue
        # The model ended thinking itself: its delimiter is completed; at EOS it wrote none, and
        # the end is forced as at the cut (delimiter and answer prefix).
        out += list(think.think_end) if stopped_at == think.think_end[0] else forced_end
        break
    tokens, stopped_at = greedy_until(model, prompt + out, max_tokens - len(out), eos, bias)  # the answer phase
    out += tokens + ([stopped_at] if stopped_at is not None else [])
    return dict(token_ids=out, think_tokens=num_think, num_waits=num_waits, forced=forced)
