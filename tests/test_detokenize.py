"""Incremental detokenization gives the same text as decoding the whole answer."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer

from zspa.runtime.detokenize import IncrementalDetokenizer


@pytest.fixture(scope="module", params=["tiny", "shapes"])
def tokenizer(request, pipeline) -> Tokenizer:
    if request.param == "tiny":
        return pipeline.prompts.tokenizer
    from zspa.export.shapes import SHAPES_MODEL_DIR

    return Tokenizer.from_file(str(SHAPES_MODEL_DIR / "tokenizer.json"))


def _check(decode, ids: list[int]) -> None:
    detokenizer = IncrementalDetokenizer(decode)
    for i, token in enumerate(ids):
        text = detokenizer.add(token)
        assert decode(ids[: i + 1]).startswith(text)  # never ahead of the full decode, never rewritten
        assert "\ufffd" not in text[-1:]
    assert detokenizer.flush() == decode(ids)


def test_incremental_text_equals_a_full_decode(tokenizer):
    rng = np.random.default_rng(0)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    for _ in range(30):
        _check(decode, rng.integers(0, tokenizer.get_vocab_size(), size=int(rng.integers(1, 120))).tolist())


def test_partial_characters_wait_for_their_last_byte():
    """A byte-level vocabulary (token i = byte i): multi-byte characters arrive a byte at a time."""
    decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")  # noqa: E731
    ids = list("héllo → 世界 🙂".encode())
    detokenizer = IncrementalDetokenizer(decode)
    assert detokenizer.add(ids[0]) == "h" and detokenizer.add(ids[1]) == "h"  # first byte of 'é'
    assert detokenizer.add(ids[2]) == "hé"
    _check(decode, ids)
    assert IncrementalDetokenizer(decode).flush() == "" and _flushed(decode, ids[:2]) == "h\ufffd"


def _flushed(decode, ids: list[int]) -> str:
    detokenizer = IncrementalDetokenizer(decode)
    for token in ids:
        detokenizer.add(token)
    return detokenizer.flush()
