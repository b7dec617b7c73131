"""Budget arithmetic (DESIGN §5), shared by the exporter, the runtime and the test oracles."""

from __future__ import annotations

import math

from zspa.errors import InvalidInputError


def round_half_up(x: float) -> int:
    """Rounds .5 up, unlike Python's banker's `round`, so 0.1 * 576 → 58 and 2.5 → 3."""
    return int(math.floor(x + 0.5))


def validate_keep(keep: float) -> float:
    if not isinstance(keep, (int, float)) or isinstance(keep, bool) or not math.isfinite(keep):
        raise InvalidInputError(f"keep must be a number in (0, 1], got {keep!r}")
    if not 0.0 < keep <= 1.0:
        raise InvalidInputError(f"keep must be in (0, 1], got {keep}")
    return float(keep)


def token_budget(keep: float, num_tokens: int) -> int:
    """K = max(1, round(keep · N)): the number of visual tokens a pruner keeps."""
    return max(1, round_half_up(validate_keep(keep) * num_tokens))


def core_size(k: int, relevance_ratio: float) -> int:
    """Tokens chosen for relevance before the diversity fill.

    At least one: α = 0 means max–min diversity seeded with the single most relevant token.
    """
    if not 0.0 <= relevance_ratio <= 1.0:
        raise InvalidInputError(f"relevance ratio must be in [0, 1], got {relevance_ratio}")
    return min(k, max(1, round_half_up(relevance_ratio * k)))
