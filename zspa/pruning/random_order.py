"""The random baseline's fixed pseudo-random order of token positions, shared by the torch
selector and the per-request ONNX graph (no torch or onnx here)."""

from __future__ import annotations

import numpy as np

# Knuth's multiplicative hash: token i's key is (i·A + seed) mod 2^31; the K smallest keys are kept.
HASH_MULTIPLIER = 2654435761
HASH_MODULUS = 1 << 31


def random_keys(n: int, seed: int) -> np.ndarray:
    return (np.arange(n, dtype=np.int64) * HASH_MULTIPLIER + seed) % HASH_MODULUS


def random_indices(n: int, k: int, seed: int) -> np.ndarray:
    """The K tokens of smallest key, ascending (the hash makes no ties below 2^31 tokens)."""
    return np.sort(np.argsort(random_keys(n, seed), kind="stable")[:k])
