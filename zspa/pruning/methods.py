"""The method registry: name + parameters → selector (torch). Names and defaults live in
`zspa.pruning` so the CLIs can validate without importing torch."""

from __future__ import annotations

from typing import Any

from zspa.errors import InvalidInputError
from zspa.pruning import METHOD_DEFAULTS
from zspa.pruning.baselines import CDPrunerSelector, DartSelector, DivPruneSelector, RandomSelector, UniformSelector
from zspa.pruning.graph import TokenSelector
from zspa.pruning.zspa_prune import ZSPASelector

_SELECTORS = {
    "zspa": ZSPASelector,
    "random": RandomSelector,
    "uniform": UniformSelector,
    "divprune": DivPruneSelector,
    "dart": DartSelector,
    "cdpruner": CDPrunerSelector,
}


def make_selector(method: str, params: dict[str, Any]) -> TokenSelector:
    if method not in _SELECTORS:
        raise InvalidInputError(f"unknown pruning method {method!r}; choose from {', '.join(_SELECTORS)}")
    unknown = set(params) - set(METHOD_DEFAULTS[method])
    if unknown:
        raise InvalidInputError(f"{method} takes no parameter(s) {', '.join(sorted(unknown))}")
    try:
        return _SELECTORS[method](**{**METHOD_DEFAULTS[method], **params})
    except ValueError as exc:
        raise InvalidInputError(f"{method}: {exc}") from None
