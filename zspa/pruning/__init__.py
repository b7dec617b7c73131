"""Visual-token pruning methods (torch, export-friendly) and the budget arithmetic they share.

Methods only choose indices; `PrunerGraph` owns the invariants every method shares (static K,
ascending order, gathering the unnormalised features), in the spirit of TensorRT Edge-LLM's
pruner base class. Importing this package does not import torch; `zspa.pruning.graph` does.
"""

from zspa.pruning.budget import core_size, token_budget

__all__ = ["core_size", "token_budget"]
