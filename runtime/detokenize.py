"""Incremental detokenization: an answer's text as its tokens arrive, never ahead of a full decode
and never rewritten, a multi-byte character only once its last byte is in.

tokenizers' own `DecodeStream` (what vLLM uses) where the tokenizers release has it (0.21.1 on);
before that, or for a plain decode function, the same contract by hand (vLLM's older offsets):
decode only the tokens since a prefix offset, twice, with and without the newest tokens, and
append the difference once it no longer ends in a partial character. Both cost O(1) per token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers before 0.21.1 (older JetPack wheels)
    DecodeStream = None


class Detokenizer(Protocol):
    tokens: list[int]
    text: str

    def add(self, token: int) -> str:
        """Appends `token`; returns the text so far (without a trailing partial character)."""

    def flush(self) -> str:
        """The whole text, with what the last tokens decode to even if that is a partial character."""


def make_detokenizer(tokenizer, decode: Callable[[list[int]], str]) -> Detokenizer:
    """`tokenizer` a `tokenizers.Tokenizer`; `decode` its full decode (special tokens skipped)."""
    if DecodeStream is None:
        return IncrementalDetokenizer(decode)
    return StreamDetokenizer(tokenizer, decode)


class StreamDetokenizer:
    def __init__(self, tokenizer, decode: Callable[[list[int]], str]):
        self._stream = DecodeStream(skip_special_tokens=True)
        self._tokenizer, self._decode = tokenizer, decode
        self.tokens: list[int] = []
        self.text = ""

    def add(self, token: int) -> str:
        self.tokens.append(token)
        chunk = self._stream.step(self._tokenizer, token)
        if chunk:
            self.text += chunk
        return self.text

    def flush(self) -> str:
        return self._decode(self.tokens)  # once per answer: what the stream still holds back included


class IncrementalDetokenizer:
    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode = decode
        self.tokens: list[int] = []
        self.text = ""
        self._prefix_offset = 0  # decode from here, for context
        self._read_offset = 0  # tokens before here are already in `text`

    def add(self, token: int) -> str:
        self.tokens.append(token)
        new = self._pending()
        if new and not new.endswith("\ufffd"):
            self.text += new
            self._prefix_offset, self._read_offset = self._read_offset, len(self.tokens)
        return self.text

    def flush(self) -> str:
        return self.text + self._pending()

    def _pending(self) -> str:
        prefix = self._decode(self.tokens[self._prefix_offset : self._read_offset])
        return self._decode(self.tokens[self._prefix_offset :])[len(prefix) :]
