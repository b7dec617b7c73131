"""Position ids of the spliced prefill sequence under the two schemes of DESIGN §6."""

from __future__ import annotations

import numpy as np

from zspa.errors import InvalidInputError

SCHEMES = ("contiguous", "original")


def prefill_positions(
    text_before: int, kept_indices: np.ndarray, num_visual_tokens: int, text_after: int, scheme: str
) -> np.ndarray:
    """int64 [text_before + K + text_after].

    contiguous: 0..S-1 over the pruned sequence. original: kept visual token i keeps position
    text_before + i, and the text after the image continues where the unpruned sequence would.
    """
    kept = len(kept_indices)
    if scheme == "contiguous":
        return np.arange(text_before + kept + text_after, dtype=np.int64)
    if scheme == "original":
        return np.concatenate(
            [
                np.arange(text_before, dtype=np.int64),
                text_before + np.asarray(kept_indices, dtype=np.int64),
                text_before + num_visual_tokens + np.arange(text_after, dtype=np.int64),
            ]
        )
    raise InvalidInputError(f"unknown position scheme {scheme!r}; expected one of {SCHEMES}")
