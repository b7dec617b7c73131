"""Position ids of the spliced prefill sequence under the two schemes of DESIGN §6, 1-D or M-RoPE."""

from __future__ import annotations

import numpy as np

from zspa.errors import InvalidInputError

SCHEMES = ("contiguous", "original")


def prefill_positions(
    text_before: int, kept_indices: np.ndarray, grid: tuple[int, int, int], text_after: int, scheme: str,
    mrope: bool = False,
) -> np.ndarray:
    """int64 [S] (or [3, S] with M-RoPE), S = text_before + K + text_after.

    contiguous: 0..S-1 over the pruned sequence (all three axes alike under M-RoPE). original: kept
    visual token i keeps the position it had unpruned (1-D: text_before + i; M-RoPE: text_before +
    its (t, h, w) on the token grid, as transformers' `get_rope_index`), and the text after the image
    continues where the unpruned sequence would.
    """
    if scheme not in SCHEMES:
        raise InvalidInputError(f"unknown position scheme {scheme!r}; expected one of {SCHEMES}")
    kept = np.asarray(kept_indices, dtype=np.int64)
    if scheme == "contiguous":
        flat = np.arange(text_before + len(kept) + text_after, dtype=np.int64)
        return np.broadcast_to(flat, (3, len(flat))).copy() if mrope else flat
    before = np.arange(text_before, dtype=np.int64)
    if not mrope:
        after = text_before + int(np.prod(grid)) + np.arange(text_after, dtype=np.int64)
        return np.concatenate([before, text_before + kept, after])
    _, height, width = grid
    visual = np.stack([kept // (height * width), kept // width % height, kept % width])
    after = text_before + max(grid) + np.arange(text_after, dtype=np.int64)
    return np.concatenate([np.broadcast_to(before, (3, text_before)), text_before + visual,
                           np.broadcast_to(after, (3, text_after))], axis=1)


def position_extent(text_before: int, kept: int, grid: tuple[int, int, int], text_after: int, scheme: str,
                    mrope: bool = False) -> int:
    """The largest prefill position + 1, before knowing which tokens are kept."""
    if scheme == "contiguous":
        return text_before + kept + text_after
    return text_before + (max(grid) if mrope else int(np.prod(grid))) + text_after
