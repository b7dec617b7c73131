"""Visual-token pruning: the methods' names and defaults, their parameters' checks (`params`), the
budget arithmetic (`budget`), and each method as one per-request ONNX graph (`onnx_pruner`), the
only implementation a bundle runs. Importing this package imports neither torch nor onnx.
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
