"""Independent numpy implementations of the pruning methods, written from DESIGN §5 alone.

They share no code with `zspa.pruning` (which is torch and written for export); the exported
graphs must reproduce them index for index.
"""

from __future__ import annotations

import math

import numpy as np


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _normalise(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _farthest_point(v, selected, k):
    min_distance = np.min(1.0 - v[selected] @ v.T, axis=0)
    while len(selected) < k:
        candidates = min_distance.copy()
        candidates[selected] = -np.inf
        j = int(np.argmax(candidates))
        selected.append(j)
        min_distance = np.minimum(min_distance, 1.0 - v @ v[j])
    return sorted(selected)


def zspa_oracle(features, prompt_embeds, prompt_mask, k: int, relevance_ratio: float, pooling: str) -> np.ndarray:
    """ZSPAPrune kept indices [B, K], ascending, in float64."""
    out = []
    for v, e, m in zip(features.astype(np.float64), prompt_embeds.astype(np.float64), prompt_mask):
        v = _normalise(v)
        question = e[m.astype(bool)]
        if pooling == "mean":
            pooled = question.mean(axis=0)
            relevance = v @ (pooled / max(np.linalg.norm(pooled), 1e-12))
        else:
            relevance = (v @ _normalise(question).T).max(axis=1)
        n_core = min(k, max(1, _round_half_up(relevance_ratio * k)))
        out.append(_farthest_point(v, list(np.argsort(-relevance, kind="stable")[:n_core]), k))
    return np.asarray(out, dtype=np.int64)


def random_oracle(n: int, k: int, seed: int, batch: int) -> np.ndarray:
    """The K positions of smallest Knuth hash (i·2654435761 + seed) mod 2^31."""
    keys = [(i * 2654435761 + seed) % 2**31 for i in range(n)]
    chosen = sorted(sorted(range(n), key=lambda i: keys[i])[:k])
    return np.tile(chosen, (batch, 1))


def uniform_oracle(n: int, k: int, batch: int) -> np.ndarray:
    """The centre of each of K equal slices of the raster-ordered token grid."""
    return np.tile([int(np.floor((i + 0.5) * n / k)) for i in range(k)], (batch, 1))


def divprune_oracle(features, k: int) -> np.ndarray:
    out = []
    for v in _normalise(features.astype(np.float64)):
        distance = 1.0 - v @ v.T
        np.fill_diagonal(distance, np.inf)
        out.append(_farthest_point(v, [int(np.argmax(distance.min(axis=1)))], k))
    return np.asarray(out, dtype=np.int64)


def dart_oracle(features, k: int, pivots: int) -> np.ndarray:
    out = []
    for f in features.astype(np.float64):
        p = min(pivots, k)
        chosen = list(np.argsort(-np.linalg.norm(f, axis=-1), kind="stable")[:p])
        v = _normalise(f)
        duplication = (v[chosen] @ v.T).max(axis=0)
        duplication[chosen] = np.inf
        chosen += list(np.argsort(duplication, kind="stable")[: k - p])
        out.append(sorted(chosen))
    return np.asarray(out, dtype=np.int64)


def cdpruner_oracle(features, prompt_embeds, prompt_mask, k: int) -> np.ndarray:
    """Greedy DPP MAP by explicit log-determinants of the kernel's principal minors (no Cholesky).

    O(K²·N·K³): for small N only."""
    out = []
    for f, e, m in zip(features.astype(np.float64), prompt_embeds.astype(np.float64), prompt_mask):
        v = _normalise(f)
        pooled = e[m.astype(bool)].mean(axis=0)
        r = v @ (pooled / np.linalg.norm(pooled))
        r = (r - r.min()) / max(r.max() - r.min(), 1e-6)
        kernel = r[:, None] * (v @ v.T) * r[None, :]
        chosen: list[int] = []
        for _ in range(k):
            best, best_logdet = -1, -np.inf
            for i in range(len(v)):
                if i in chosen:
                    continue
                idx = chosen + [i]
                sign, logdet = np.linalg.slogdet(kernel[np.ix_(idx, idx)])
                if sign > 0 and logdet > best_logdet:
                    best, best_logdet = i, logdet
            chosen.append(best)
        out.append(sorted(chosen))
    return np.asarray(out, dtype=np.int64)
