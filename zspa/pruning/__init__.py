"""Visual-token pruning methods (torch, export-friendly) and the budget arithmetic they share.

Methods only choose indices; `PrunerGraph` owns the invariants every method shares (static K,
ascending order, gathering the unnormalised features), in the spirit of TensorRT Edge-LLM's
pruner base class. Importing this package does not import torch; `zspa.pruning.graph` does.
"""

from zspa.pruning.budget import core_size, token_budget

# Every method and its default parameters (zspa.pruning.methods builds the torch selectors).
METHOD_DEFAULTS: dict[str, dict] = {
    # α = 0.25 and mean pooling: chosen on the shapes benchmark (docs/evaluation.md).
    "zspa": {"relevance_ratio": 0.25, "pooling": "mean"},
    "random": {"seed": 0},
    "uniform": {},
    "divprune": {},
    "dart": {"pivots": 8},
    "cdpruner": {},
}
METHODS = tuple(METHOD_DEFAULTS)

# CDPruner's greedy DPP: a token whose residual variance is below this adds no new direction (the
# kernel's rank is spent, as on images with large uniform areas). It is still picked, but the
# Cholesky update is skipped: dividing by its near-zero variance sent the residuals to ±inf and
# NaN, and the graph then picked an out-of-range token.
DPP_EPSILON = 1e-6

__all__ = ["DPP_EPSILON", "METHODS", "METHOD_DEFAULTS", "core_size", "token_budget"]
