"""DeepStack (Qwen3-VL): visual feature planes from early vision blocks that the decoder adds to
its hidden states at the image positions after its first layers (DESIGN §4).

Pruning keeps the same tokens in every plane as in `image_features`: whatever method chose the
kept indices, `gather` applies them here, once, so no pruner graph knows about DeepStack. The
decoder graph takes the planes dense, [L, B, S, D] with zero rows outside the image (adding a
zero is exact), so prefill and every decode step run one graph with static rank.
"""

from __future__ import annotations

import numpy as np


def gather(planes: np.ndarray, kept_indices: np.ndarray) -> np.ndarray:
    """[L, 1, N, D] planes → [L, 1, K, D] at the kept visual tokens (ascending indices)."""
    return planes[:, :, kept_indices]


def splice(planes: np.ndarray, rows: np.ndarray, length: int) -> np.ndarray:
    """Kept planes [L, 1, K, D] (every image's, in prompt order) placed at the prefill's `rows` [K]
    (where the kept visual tokens sit) of a prefill of `length` rows, zeros elsewhere."""
    dense = np.zeros((planes.shape[0], 1, length, planes.shape[3]), dtype=planes.dtype)
    dense[:, :, rows] = planes
    return dense

