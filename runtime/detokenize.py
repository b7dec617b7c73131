"""Incremental detokenization: the answer's text grows by a short window's decode per token.

Re-decoding every token each step costs O(n) per token, O(n²) per answer. As vLLM does, decode
only the tokens since a prefix offset, twice (with and without the newest tokens) and append the
difference, so both decodes see the same leading context (SentencePiece space handling, byte
fallback); text is only appended once it no longer ends in a partial character.
"""

from __future__ import annotations

from collections.abc import Callable


class IncrementalDetokenizer:
    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode = decode
        self.tokens: list[int] = []
        self.text = ""
        self._prefix_offset = 0  # decode from here, for context
        self._read_offset = 0  # tokens before here are already in `text`

    def add(self, token: int) -> str:
        """Appends `token`; returns the text so far (without a trailing partial character)."""
        self.tokens.append(token)
        new = self._pending()
        if new and not new.endswith("\ufffd"):
            self.text += new
            self._prefix_offset, self._read_offset = self._read_offset, len(self.tokens)
        return self.text

    def flush(self) -> str:
        """The whole text, with what the last tokens decode to even if that is a partial character."""
        return self.text + self._pending()

    def _pending(self) -> str:
        prefix = self._decode(self.tokens[self._prefix_offset : self._read_offset])
        return self._decode(self.tokens[self._prefix_offset :])[len(prefix) :]
