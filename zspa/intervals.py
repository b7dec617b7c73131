"""Percentile-bootstrap confidence intervals over questions (numpy only: the runtime's zspa-eval
uses them). Columns are resampled together, so paired scores (the same questions under two
settings) stay paired and a margin's interval reflects only the questions' variation."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

ROUNDS = 2000
LEVEL = 0.95


def bootstrap_interval(statistic: Callable[..., np.ndarray], *columns: Sequence[float], rounds: int = ROUNDS,
                       level: float = LEVEL, seed: int = 0) -> tuple[float, float]:
    """The `level` interval of `statistic` over `rounds` resamples of the rows. `statistic`
    receives each column resampled as a (rounds, n) array and returns one value per round."""
    n = len(columns[0])
    if n == 0 or any(len(c) != n for c in columns):
        raise ValueError("bootstrap needs columns of one non-zero length")
    rows = np.random.default_rng(seed).integers(0, n, size=(rounds, n))
    values = statistic(*(np.asarray(c, dtype=np.float64)[rows] for c in columns))
    low, high = np.nanpercentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def mean_of(correct: np.ndarray) -> np.ndarray:
    return correct.mean(axis=1)


def ratio_of_means(correct: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Retained accuracy: accuracy under a setting over accuracy of the reference, per resample."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return correct.mean(axis=1) / reference.mean(axis=1)


def difference_of_means(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    return first.mean(axis=1) - second.mean(axis=1)
