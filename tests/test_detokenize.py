"""Incremental detokenization gives the same text as decoding the whole answer: tokenizers'
DecodeStream where it exists, the hand-written fallback elsewhere, and the two agree."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer

from zspa.runtime import detokenize
from zspa.runtime.detokenize import IncrementalDetokenizer, StreamDetokenizer, make_detokenizer


@pytest.fixture(scope="module", params=["tiny", "shapes"])
def tokenizer(request, pipeline) -> Tokenizer:
    if request.param == "tiny":
        return pipeline.prompts.tokenizer
    from zspa.export.shapes import SHAPES_MODEL_DIR

    return Tokenizer.from_file(str(SHAPES_MODEL_DIR / "tokenizer.json"))


def _check(decode, ids: list[int], detokenizer=None) -> list[str]:
    """Every step's text is a prefix of the full decode, never ends in a partial character, and
    the flush is the full decode; returns the steps' texts."""
    detokenizer = detokenizer or IncrementalDetokenizer(decode)
    steps = []
    for i, token in enumerate(ids):
        text = detokenizer.add(token)
        assert decode(ids[: i + 1]).startswith(text)  # never ahead of the full decode, never rewritten
        assert "\ufffd" not in text[-1:]
        steps.append(text)
    assert detokenizer.flush() == decode(ids)
    return steps


def test_incremental_text_equals_a_full_decode(tokenizer):
    """Both ways, on random answers (ids past the vocabulary too, as a padded lm_head samples):
    each a prefix of the full decode at every step, the full decode at the end, and the final
    streamed texts equal."""
    rng = np.random.default_rng(0)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    for _ in range(30):
        ids = rng.integers(0, tokenizer.get_vocab_size() + 8, size=int(rng.integers(1, 120))).tolist()
        by_hand = _check(decode, ids)
        streamed = _check(decode, ids, StreamDetokenizer(tokenizer, decode))
        assert streamed[-1] == by_hand[-1]


def test_the_library_stream_is_used_where_tokenizers_has_it(tokenizer, monkeypatch):
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    assert isinstance(make_detokenizer(tokenizer, decode), StreamDetokenizer)  # tokenizers ≥ 0.21.1 here
    monkeypatch.setattr(detokenize, "DecodeStream", None)
    assert isinstance(make_detokenizer(tokenizer, decode), IncrementalDetokenizer)


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
