"""Incremental detokenization that is safe for byte-level and SentencePiece tokenizers.

Each step decodes a short window (a few tokens of context + the new ones) and emits only the
characters the window gained, holding back while the tail is an incomplete UTF-8 sequence.
Token ids the tokenizer does not know (models whose embedding has more rows than the vocabulary
can emit them) decode to nothing instead of crashing.
"""

from .sequence import Sequence

# Tokens of prompt context decoded with the first output tokens, so a leading-space marker
# ("▁" in SentencePiece) is rendered the way it is inside a longer text.
CONTEXT_TOKENS = 5


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)

    def _decode(self, token_ids: list[int], skip_special_tokens: bool) -> str:
        known = [t for t in token_ids if 0 <= t < self.vocab_size]
        return self.tokenizer.decode(known, skip_special_tokens=skip_special_tokens)

    def start(self, seq: Sequence) -> None:
        seq.read_offset = seq.num_prompt_tokens
        seq.prefix_offset = max(seq.num_prompt_tokens - CONTEXT_TOKENS, 0)

    def step(self, seq: Sequence, skip_special_tokens: bool = True, final: bool = False) -> str:
        """Append the text of newly added tokens to `seq.text` and return it ('' if still pending).

        `final` flushes an incomplete character as U+FFFD, as a full decode of the tokens would.
        """
        ids = seq.token_ids
        prefix_text = self._decode(ids[seq.prefix_offset : seq.read_offset], skip_special_tokens)
        new_text = self._decode(ids[seq.prefix_offset :], skip_special_tokens)
        if len(new_text) <= len(prefix_text) or (new_text.endswith("\ufffd") and not final):
            return ""  # nothing printable yet, or a multi-byte character is still incomplete
        delta = new_text[len(prefix_text) :]
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
        seq.text += delta
        return delta
