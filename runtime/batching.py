"""Rows of different requests decoding together: one decoder call per step for all of them.

The portable decoder (past → past + new, `--kv-cache concat`) takes a batch with an attention
mask, so rows of different lengths share one KV cache [B, H, T, D]: each row's entries sit at
the right end, the columns to their left are padding the mask hides. A request joins after its
own prefill (batch of one) and leaves when done; the cache is re-laid out only then, never
between steps. Padding changes the order of a few float sums, not what is summed: greedy
answers equal one-at-a-time answers up to that noise (tests/test_batching.py).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from zspa.errors import ZspaError
from zspa.runtime.backends import DecoderSession, OrtDecoder


class SoloDecode:
    """A batch of one on the prefill's own decoder (any backend): its cache is used in place."""

    def __init__(self, decoder: DecoderSession):
        self.decoder = decoder
        self.rows = 0

    def __len__(self) -> int:
        return self.rows

    def add(self, prefilled: DecoderSession) -> None:
        if prefilled is not self.decoder or self.rows:
            raise ZspaError("a batch of one takes only the request its own decoder prefilled")
        self.rows = 1

    def remove(self, rows: set[int]) -> None:
        self.rows -= len(rows)

    def step(self, inputs_embeds: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        mask = np.ones((1, self.decoder.past_length + 1), np.int64)
        return self.decoder.step(inputs_embeds, mask, position_ids)


class DecodeBatch:
    def __init__(self, decoder: OrtDecoder):
        """`decoder`: a portable ORT decoder of its own (it may share the session with the prefill one)."""
        self.decoder = decoder
        self.lengths: list[int] = []  # each row's entries in the cache
        decoder.reset()

    def __len__(self) -> int:
        return len(self.lengths)

    def add(self, prefilled: OrtDecoder) -> None:
        """Appends the row `prefilled` (the prefill's decoder, batch of one) holds in its cache."""
        past, length = _arrays(prefilled), prefilled.past_length
        width = max(self.decoder.past_length, length)
        current = _arrays(self.decoder) if self.lengths else [np.empty((0, *p.shape[1:2], 0, *p.shape[3:]), p.dtype)
                                                       for p in past]
        self._store([np.concatenate([_pad_left(c, width), _pad_left(p, width)]) for c, p in zip(current, past)],
                    width)
        self.lengths.append(length)

    def remove(self, rows: set[int]) -> None:
        """Drops finished rows, and the padding columns no remaining row needs."""
        if not rows:
            return
        kept = [i for i in range(len(self.lengths)) if i not in rows]
        self.lengths = [self.lengths[i] for i in kept]
        if not kept:
            self.decoder.reset()
            return
        width = max(self.lengths)
        start = self.decoder.past_length - width
        self._store([a[kept][:, :, start:] for a in _arrays(self.decoder)], width)

    def step(self, inputs_embeds: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """One new token per row ([B, 1, H] embeddings, rows in `add` order); returns logits [B, V]."""
        total = self.decoder.past_length + 1
        mask = np.zeros((len(self.lengths), total), np.int64)
        for row, length in enumerate(self.lengths):
            mask[row, total - length - 1:] = 1
        logits = self.decoder.step(inputs_embeds, mask, position_ids)
        self.lengths = [length + 1 for length in self.lengths]
        return logits

    def _store(self, arrays: list[np.ndarray], width: int) -> None:
        self.decoder.past = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), self.decoder.device, 0)
                             for a in arrays]
        self.decoder.past_length = width


def _arrays(decoder: OrtDecoder) -> list[np.ndarray]:
    return [value.numpy() for value in decoder.past]


def _pad_left(array: np.ndarray, width: int) -> np.ndarray:
    missing = width - array.shape[2]
    if missing == 0:
        return array
    padding = np.zeros((*array.shape[:2], missing, *array.shape[3:]), array.dtype)
    return np.concatenate([padding, array], axis=2)


DEFAULT_MAX_BATCH = 8


def batch_size(decoder: DecoderSession, requested: int | None) -> int:
    """`requested`, or DEFAULT_MAX_BATCH where `decoder` can batch and 1 where it cannot."""
    if requested is not None:
        return requested
    return DEFAULT_MAX_BATCH if type(decoder) is OrtDecoder else 1


def decode_rows(decoder: DecoderSession, max_batch: int) -> SoloDecode | DecodeBatch:
    """Where decoding happens for up to `max_batch` rows; `decoder` is the one requests prefill on."""
    if max_batch == 1:
        return SoloDecode(decoder)
    if type(decoder) is not OrtDecoder:
        raise ZspaError(f"--max-batch {max_batch} needs the portable decoder on onnxruntime (a bundle exported "
                        "with --kv-cache concat, an ort-* backend); use --max-batch 1 for this one")
    return DecodeBatch(OrtDecoder(decoder.session, decoder.spec, decoder.device))
