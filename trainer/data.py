"""s1K-schema data -> token ids with a completion mask, the way the server will see them.

A sample becomes the chat prompt (system + question, tokenized by the model's chat template and
opened for the assistant exactly as the server does it: no loss) followed by the assistant turn the
server's ThinkTemplate describes (think opener unless the template's generation prompt already
opens thinking, trajectory, delimiter, answer prefix, attempt, end of turn: loss). Tokenizing the
two parts separately and concatenating is exact because the assistant turn starts at a special
token (`<|im_start|>`, `<think>`) or right after one, where no BPE merge crosses.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

from dataset_builder.io import load_table
from server.engine.detokenizer import decode_known
from server.engine.think import (
    THINK_TEMPLATES,
    ThinkTemplate,
    assistant_turn_end,
    chat_prompt_ids,
    require_representable,
    think_opener,
)
from server.errors import DataError, InvalidConfigError, InvalidRequestError

from .config import TrainConfig

log = logging.getLogger(__name__)

# (trajectory, attempt) column pairs, first match wins: s1K, then s1K-1.1's DeepSeek-R1 traces.
KNOWN_TRACE_FIELDS = (("thinking_trajectories", "attempt"), ("deepseek_thinking_trajectory", "deepseek_attempt"))


def load_s1k(path: str | Path):
    """An s1K-schema dataset from disk: a `save_to_disk` directory (a DatasetDict uses its "train"
    split), a Parquet file or a JSONL file."""
    try:
        return load_table(path)
    except DataError as exc:
        raise DataError(f"dataset: {exc}") from exc


def trace_fields(columns: list[str], config: TrainConfig) -> tuple[str, str]:
    """The (trajectory, attempt) columns to train on: the configured ones, or the first known pair."""
    if config.trajectory_field or config.attempt_field:
        pair = (config.trajectory_field or "thinking_trajectories", config.attempt_field or "attempt")
        candidates = (pair,)
    else:
        candidates = KNOWN_TRACE_FIELDS
    for pair in candidates:
        if "question" in columns and all(name in columns for name in pair):
            return pair
    wanted = " or ".join(f"question + {t} + {a}" for t, a in candidates)
    raise DataError(f"dataset: needs the columns {wanted}; it has {sorted(columns)}")


def first_trajectory(value) -> str:
    """s1K stores `thinking_trajectories` as a list with one trace; s1K-1.1 stores a string."""
    if isinstance(value, list):
        return value[0] if value else ""
    return value or ""


@dataclass(frozen=True)
class SampleRenderer:
    """Renders and tokenizes one sample; picklable so `datasets.map` can run it in workers."""

    tokenizer: object
    template: ThinkTemplate
    system_prompt: str
    turn_end: str
    trajectory_field: str
    attempt_field: str

    def texts(self, sample: dict) -> tuple[list[int], str]:
        """The prompt's token ids (what the server feeds for the same messages) and the completion text."""
        messages = [{"role": "user", "content": sample["question"]}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        prompt_ids = chat_prompt_ids(self.tokenizer, messages)
        opened = think_opener(self.template, decode_known(self.tokenizer, prompt_ids, skip_special_tokens=False)) == ""
        thinking, attempt = first_trajectory(sample[self.trajectory_field]).strip(), sample[self.attempt_field].strip()
        return prompt_ids, self.template.reply(thinking, attempt, opened=opened) + self.turn_end

    def __call__(self, sample: dict) -> dict:
        prompt_ids, completion = self.texts(sample)
        completion_ids = self.tokenizer(completion, add_special_tokens=False).input_ids
        return {
            "input_ids": prompt_ids + completion_ids,
            "completion_mask": [0] * len(prompt_ids) + [1] * len(completion_ids),
        }


def make_renderer(tokenizer, config: TrainConfig, columns: list[str]) -> SampleRenderer:
    template = THINK_TEMPLATES[config.think_format]
    try:
        require_representable(template, tokenizer)
        turn_end = assistant_turn_end(tokenizer) if tokenizer.chat_template else None
    except InvalidRequestError as exc:
        raise InvalidConfigError(f"think_format: {exc.message}") from exc
    if turn_end is None:
        raise InvalidConfigError(f"model: the tokenizer of {config.model} has no chat template, so the server could not render chats")
    trajectory, attempt = trace_fields(columns, config)
    return SampleRenderer(tokenizer, template, config.system_prompt, turn_end, trajectory, attempt)


@dataclass
class OverlongReport:
    count: int
    longest: int
    policy: str


def tokenize_dataset(data, renderer: SampleRenderer, config: TrainConfig):
    """Tokenized samples (input_ids, completion_mask) and what happened to over-long ones."""
    tokenized = data.map(renderer, remove_columns=data.column_names, num_proc=config.dataset_num_proc, desc="Rendering s1 samples")
    lengths = [len(ids) for ids in tokenized["input_ids"]]
    over = [n for n in lengths if n > config.max_seq_length]
    report = OverlongReport(len(over), max(lengths), config.overlong)
    if over:
        log.warning(
            "%d of %d samples exceed max_seq_length %d (longest %d tokens): %s",
            len(over), len(lengths), config.max_seq_length, report.longest,
            "truncated" if config.overlong == "truncate" else "dropped",
        )
        limit = config.max_seq_length
        if config.overlong == "drop":
            tokenized = tokenized.filter(lambda ids: len(ids) <= limit, input_columns="input_ids")
        else:
            tokenized = tokenized.map(lambda s: {k: v[:limit] for k, v in s.items()}, desc="Truncating")
    if len(tokenized) == 0:
        raise DataError(f"dataset: every sample is longer than max_seq_length {config.max_seq_length}")
    return tokenized, report
