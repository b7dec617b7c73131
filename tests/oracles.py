"""Independent numpy implementations of the pruning methods, written from DESIGN §5 alone.

They share no code with `zspa.pruning` (which is torch and written for export); the exported
graphs must reproduce them index for index.
"""

from __future__ import annotations

import math

import numpy as np


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def zspa_oracle(features, prompt_embeds, prompt_mask, k: int, alpha: float, pooling: str) -> np.ndarray:
    """ZSPAPrune kept indices [B, K], ascending, in float64."""
    out = []
    for v, e, m in zip(features.astype(np.float64), prompt_embeds.astype(np.float64), prompt_mask):
        v = v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
        question = e[m.astype(bool)]
        if pooling == "mean":
            pooled = question.mean(axis=0)
            relevance = v @ (pooled / max(np.linalg.norm(pooled), 1e-12))
        else:
            q = question / np.maximum(np.linalg.norm(question, axis=-1, keepdims=True), 1e-12)
            relevance = (v @ q.T).max(axis=1)
        n_core = min(k, max(1, _round_half_up(alpha * k)))
        selected = list(np.argsort(-relevance, kind="stable")[:n_core])
        min_distance = np.min(1.0 - v[selected] @ v.T, axis=0)
        while len(selected) < k:
            candidates = min_distance.copy()
            candidates[selected] = -np.inf
            j = int(np.argmax(candidates))
            selected.append(j)
            min_distance = np.minimum(min_distance, 1.0 - v @ v[j])
        out.append(sorted(selected))
    return np.asarray(out, dtype=np.int64)
