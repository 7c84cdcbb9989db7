"""Incremental detokenization that is safe for byte-level and SentencePiece tokenizers.

Each step decodes a short window (a few tokens of context + the new ones) and emits only the
characters the window gained, holding back while the tail is an incomplete UTF-8 sequence.
Token ids the tokenizer does not know (models whose embedding has more rows than the vocabulary
can emit them) decode to nothing instead of crashing.
"""

# Tokens of prompt context decoded with the first output tokens, so a leading-space marker
# ("▁" in SentencePiece) is rendered the way it is inside a longer text.
CONTEXT_TOKENS = 5


def decode_known(tokenizer, token_ids, skip_special_tokens: bool = True, vocab_size: int | None = None) -> str:
    """`tokenizer.decode` of the ids the tokenizer knows (`vocab_size`: len(tokenizer), when the
    caller has it); unknown ids decode to nothing."""
    size = len(tokenizer) if vocab_size is None else vocab_size
    return tokenizer.decode([t for t in token_ids if 0 <= t < size], skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    """One request's output tokens turned into text step by step (special tokens skipped)."""

    def __init__(self, tokenizer, vocab_size: int, prompt_token_ids: list[int]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.token_ids = list(prompt_token_ids[-CONTEXT_TOKENS:])  # context, then every output token
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)

    def add(self, token_ids, final: bool = False) -> str:
        """The text that `token_ids` (appended now) add, '' while a character is incomplete.

        `final` flushes an incomplete character as U+FFFD, as a full decode of the tokens would.
        """
        self.token_ids += token_ids
        ids = self.token_ids
        prefix_text = decode_known(self.tokenizer, ids[self.prefix_offset : self.read_offset], vocab_size=self.vocab_size)
        new_text = decode_known(self.tokenizer, ids[self.prefix_offset :], vocab_size=self.vocab_size)
        if len(new_text) <= len(prefix_text) or (new_text.endswith("\ufffd") and not final):
            return ""  # nothing printable yet, or a multi-byte character is still incomplete
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        return new_text[len(prefix_text) :]
