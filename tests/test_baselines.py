"""Peer methods as per-request graphs against independent numpy oracles (issue 4, point 1), and
against the eager torch selectors the PyTorch references use."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zspa.errors import InvalidInputError
from zspa.pruning import METHOD_DEFAULTS, METHODS
from zspa.pruning.budget import token_budget
from zspa.pruning.onnx_pruner import build_pruner
from zspa.pruning.params import method_params

from oracles import cdpruner_oracle, dart_oracle, divprune_oracle, random_oracle, uniform_oracle, zspa_oracle
from test_pruner import pruner_graph, random_inputs
from test_pruner import run as run_graph
from torch_pruners import make_selector


def run(session, features, prompt, mask, k):
    kept, indices = run_graph(session, features, prompt, mask, k)
    np.testing.assert_array_equal(kept, np.take_along_axis(features, indices[..., None], axis=1))
    return indices


def eager(method, features, prompt, mask, k):
    selector = make_selector(method, {})
    return selector(*map(torch.from_numpy, (features, prompt, mask)), k).sort(-1).values.numpy()


ORACLES = {
    "zspa": lambda f, p, m, k: zspa_oracle(f, p, m, k, **METHOD_DEFAULTS["zspa"]),
    "random": lambda f, p, m, k: random_oracle(f.shape[1], k, 0, len(f)),
    "uniform": lambda f, p, m, k: uniform_oracle(f.shape[1], k, len(f)),
    "divprune": lambda f, p, m, k: divprune_oracle(f, k),
    "dart": lambda f, p, m, k: dart_oracle(f, k, 8),
    "cdpruner": lambda f, p, m, k: cdpruner_oracle(f, p, m, k),
}


def test_every_method_has_an_oracle():
    assert set(ORACLES) == set(METHODS)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "cdpruner"])
@pytest.mark.parametrize("n, keep", [(576, 0.1), (576, 0.25), (1196, 0.1), (64, 1.0)])
def test_method_graph_matches_oracle(method, n, keep):
    """LLaVA-1.5 at keep 0.1 (N = 576, K = 58) and a 1280×720 Qwen2.5-VL image (N = 1196), batch 2,
    from one graph per method; and the eager torch selector agrees."""
    session = pruner_graph(method, {})
    k = token_budget(keep, n)
    for seed in range(2):
        features, prompt, mask = random_inputs(seed, n=n)
        expected = ORACLES[method](features, prompt, mask, k)
        np.testing.assert_array_equal(run(session, features, prompt, mask, k), expected)
        np.testing.assert_array_equal(eager(method, features, prompt, mask, k), expected)


@pytest.mark.parametrize("method", METHODS)
def test_budgets_smaller_than_method_parameters(method):
    """K = 3 of 64 (keep 0.05 on shapes-llava): below DART's 8 pivots, α·K rounding to the core."""
    features, prompt, mask = random_inputs(5, batch=2, n=64, d=32)
    expected = ORACLES[method](features, prompt, mask, 3)
    np.testing.assert_array_equal(run(pruner_graph(method, {}, d=32), features, prompt, mask, 3), expected)
    np.testing.assert_array_equal(eager(method, features, prompt, mask, 3), expected)


def test_cdpruner_graph_matches_determinant_oracle():
    """The oracle maximises explicit log-determinants, so it runs at a smaller scale."""
    session = pruner_graph("cdpruner", {}, d=32)
    for seed, k in [(0, 12), (1, 12), (2, 1), (3, 20)]:
        features, prompt, mask = random_inputs(seed, n=64, d=32)
        expected = cdpruner_oracle(features, prompt, mask, k)
        np.testing.assert_array_equal(run(session, features, prompt, mask, k), expected)


def test_cdpruner_graph_matches_eager_selector_at_scale():
    session = pruner_graph("cdpruner", {}, d=256)
    for n in (576, 1196):
        features, prompt, mask = random_inputs(4, n=n, d=256)
        k = token_budget(0.1, n)
        expected = eager("cdpruner", features, prompt, mask, k)
        np.testing.assert_array_equal(run(session, features, prompt, mask, k), expected)


def test_prompt_aware_methods_follow_the_question():
    """Change only the question: zspa and cdpruner change their choice, the others do not."""
    features, prompt, mask = random_inputs(3, batch=1)
    other = np.random.default_rng(99).standard_normal(prompt.shape).astype(np.float32)
    for method in METHODS:
        session = pruner_graph(method, {})
        picks = [run(session, features, p, mask, 58) for p in (prompt, other)]
        assert np.array_equal(picks[0], picks[1]) == (method not in ("zspa", "cdpruner")), method


@pytest.mark.parametrize("method, params, message", [
    ("fastv", {}, "unknown pruning method 'fastv'"),
    ("uniform", {"seed": 1}, "uniform takes no parameter"),
    ("zspa", {"pooling": "median"}, "pooling must be one of"),
    ("zspa", {"relevance_ratio": 1.5}, "relevance ratio must be in \\[0, 1\\]"),
    ("dart", {"pivots": 0}, "pivots must be an integer ≥ 1"),
    ("dart", {"pivots": 2.5}, "pivots must be an integer ≥ 1"),
    ("random", {"seed": -1}, "seed must be an integer ≥ 0"),
])
def test_unknown_methods_and_bad_parameters_are_refused_before_a_graph_is_built(method, params, message):
    with pytest.raises(InvalidInputError, match=message):
        method_params(method, params)
    with pytest.raises(InvalidInputError, match=message):
        build_pruner(method, params, hidden=8)
