"""Position ids of the spliced prefill sequence under the two schemes of DESIGN §6, 1-D or M-RoPE.

A prompt is text runs around image blocks: `texts` holds the lengths of the n + 1 text runs around
n blocks (text before the first image, between images, after the last), each block its kept
visual-token indices and its token grid (t, h, w).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from zspa.errors import InvalidInputError

SCHEMES = ("contiguous", "original")

Grid = tuple[int, int, int]


def _check(texts: Sequence[int], blocks: Sequence[object], scheme: str) -> None:
    if scheme not in SCHEMES:
        raise InvalidInputError(f"unknown position scheme {scheme!r}; expected one of {SCHEMES}")
    if len(texts) != len(blocks) + 1:
        raise InvalidInputError(f"{len(blocks)} image blocks take {len(blocks) + 1} text runs, got {len(texts)}")


def _block_span(grid: Grid, mrope: bool) -> int:
    """How far an unpruned block advances the next position: its tokens (1-D), or one past its
    largest (t, h, w) index (M-RoPE, as transformers' `get_rope_index` starts the next text there)."""
    return max(grid) if mrope else int(np.prod(grid))


def prefill_positions(texts: Sequence[int], kept: Sequence[np.ndarray], grids: Sequence[Grid], scheme: str,
                      mrope: bool = False) -> np.ndarray:
    """int64 [S] (or [3, S] with M-RoPE), S = Σ texts + Σ kept tokens.

    contiguous: 0..S-1 over the pruned sequence (all three axes alike under M-RoPE). original: each
    kept visual token keeps the position it had unpruned (1-D: the block's start + its index; M-RoPE:
    the block's start + its (t, h, w) on the token grid, as `get_rope_index`), and every text run
    continues where the unpruned sequence would.
    """
    _check(texts, kept, scheme)
    total = sum(texts) + sum(len(k) for k in kept)
    if scheme == "contiguous":
        flat = np.arange(total, dtype=np.int64)
        return np.broadcast_to(flat, (3, total)).copy() if mrope else flat
    parts, start = [], 0
    for i, length in enumerate(texts):
        run = start + np.arange(length, dtype=np.int64)
        parts.append(np.broadcast_to(run, (3, length)) if mrope else run)
        start += length
        if i == len(kept):
            break
        indices = np.asarray(kept[i], dtype=np.int64)
        if mrope:
            _, height, width = grids[i]
            parts.append(start + np.stack([indices // (height * width), indices // width % height, indices % width]))
        else:
            parts.append(start + indices)
        start += _block_span(grids[i], mrope)
    return np.concatenate(parts, axis=-1)


def position_extent(texts: Sequence[int], kept: int, grids: Sequence[Grid], scheme: str,
                    mrope: bool = False) -> int:
    """The largest prefill position + 1, before knowing which tokens are kept (`kept`: how many
    in all, `grids`: each block's)."""
    _check(texts, grids, scheme)
    if scheme == "contiguous":
        return sum(texts) + kept
    return sum(texts) + sum(_block_span(grid, mrope) for grid in grids)
