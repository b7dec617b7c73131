"""A method's parameters, checked before anything is built: the one place the exporter, the pruner
graph builder and the test references learn what a method takes. No torch or onnx here."""

from __future__ import annotations

from typing import Any

from zspa.errors import InvalidInputError
from zspa.pruning import METHOD_DEFAULTS
from zspa.pruning.budget import core_size

POOLINGS = ("mean", "max")  # how the question's token embeddings become one vector (ZSPAPrune, CDPruner)


def method_params(method: str, params: dict[str, Any]) -> dict[str, Any]:
    """`params` over the method's defaults, every name and value checked."""
    if method not in METHOD_DEFAULTS:
        raise InvalidInputError(f"unknown pruning method {method!r}; choose from {', '.join(METHOD_DEFAULTS)}")
    unknown = set(params) - set(METHOD_DEFAULTS[method])
    if unknown:
        raise InvalidInputError(f"{method} takes no parameter(s) {', '.join(sorted(unknown))}")
    merged = {**METHOD_DEFAULTS[method], **params}
    if "pooling" in merged and merged["pooling"] not in POOLINGS:
        raise InvalidInputError(f"{method}: pooling must be one of {POOLINGS}, got {merged['pooling']!r}")
    if "relevance_ratio" in merged:
        core_size(1, merged["relevance_ratio"])  # the ratio's own check and message
    for name, least in (("pivots", 1), ("seed", 0)):
        value = merged.get(name, least)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise InvalidInputError(f"{method}: {name} must be an integer ≥ {least}, got {value!r}")
    return merged
