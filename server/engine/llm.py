"""The offline facade: `LLM(model_dir, **config).generate(prompts, sampling, budget)` -> list[RequestOutput]."""

import itertools
from collections.abc import Sequence as Seq
from pathlib import Path

from tqdm import tqdm

from .config import EngineConfig
from .engine import LLMEngine, Prompt
from ..errors import InvalidRequestError
from .outputs import RequestOutput
from .params import SamplingParams, ThinkBudget


class LLM:
    def __init__(self, model_dir: str | Path, **config):
        self.engine = LLMEngine(model_dir, EngineConfig(**config))
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def shutdown(self) -> None:
        """Stop the tensor-parallel ranks (nothing to do for one rank)."""
        self.engine.runner.shutdown()

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        sampling: SamplingParams | list[SamplingParams] | None = None,
        budget: ThinkBudget | list[ThinkBudget | None] | None = None,
        progress: str | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt in one continuous batch; outputs come back in prompt order.

        Every request is validated before any is scheduled, so one bad prompt fails the call
        without leaving the others half-run. `progress`: a label for a progress bar (on stderr)
        of finished requests and generated tokens per second, as vLLM's `use_tqdm`.
        """
        if isinstance(prompts, str) or (prompts and all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]
        samplings = _per_prompt(sampling if sampling is not None else SamplingParams(), len(prompts), "sampling")
        budgets = _per_prompt(budget, len(prompts), "budget")
        seqs = [
            self.engine.make_sequence(f"llm-{next(self._ids)}", p, s, b) for p, s, b in zip(prompts, samplings, budgets)
        ]
        outputs = {(s.request_id, i): RequestOutput(s.request_id, list(s.prompt_token_ids))
                   for s in seqs for i in range(s.sampling.n)}
        bar = tqdm(total=len(seqs), desc=progress, unit="req", dynamic_ncols=True) if progress else None
        generated = 0
        try:
            for seq in seqs:
                self.engine.add_sequence(seq)
            while self.engine.has_unfinished():
                for delta in self.engine.step():
                    outputs[delta.request_id, delta.index].add(delta)
                    generated += len(delta.new_token_ids)
                    if bar is not None:
                        elapsed = bar.format_dict["elapsed"]
                        bar.set_postfix_str(f"{generated / elapsed if elapsed else 0:.1f} tok/s", refresh=False)
                        bar.update(int(delta.request_finished))
        except BaseException:  # an exception or Ctrl-C: leave the engine as it was, ready for the next call
            for seq in seqs:
                if seq.request_id in self.engine.sequences:
                    self.engine.abort(seq.request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        for s in seqs:
            if s.sampling.n > 1:
                outputs[s.request_id, 0].samples = [outputs[s.request_id, i] for i in range(s.sampling.n)]
        return [outputs[s.request_id, 0] for s in seqs]

    def chat(
        self,
        conversations: list[dict] | list[list[dict]],
        sampling: SamplingParams | list[SamplingParams] | None = None,
        budget: ThinkBudget | list[ThinkBudget | None] | None = None,
        chat_template_kwargs: dict | None = None,
        progress: str | None = None,
    ) -> list[RequestOutput]:
        """`generate` for chat messages, as the model's chat template tokenizes them (the think
        opener is added to budgeted ones that do not open thinking)."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        return self.generate([self.engine.render_chat(c, chat_template_kwargs) for c in conversations], sampling, budget,
                             progress)


def _per_prompt(value, n: int, name: str) -> list:
    if isinstance(value, Seq) and not isinstance(value, str):
        if len(value) != n:
            raise InvalidRequestError(name, f"has {len(value)} entries for {n} prompts")
        return list(value)
    return [value] * n
