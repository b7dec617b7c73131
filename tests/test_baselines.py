"""Peer methods as exported graphs against independent numpy oracles (issue 4, point 1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zspa.errors import InvalidInputError
from zspa.pruning import METHOD_DEFAULTS, METHODS
from zspa.pruning.methods import make_selector

from oracles import cdpruner_oracle, dart_oracle, divprune_oracle, random_oracle, uniform_oracle, zspa_oracle
from test_pruner import exported_session, random_inputs


def exported(method, params, k, n, d, path):
    return exported_session(make_selector(method, params), path, k, n, d)


def run(session, features, prompt, mask):
    kept, indices = session.run(None, {"image_features": features, "prompt_embeds": prompt, "prompt_mask": mask})
    np.testing.assert_array_equal(kept, np.take_along_axis(features, indices[..., None], axis=1))
    return indices


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
def test_method_graph_matches_oracle_at_llava_scale(method, tmp_path):
    """N = 576, K = 58, batch 2, as LLaVA-1.5 at keep 0.1."""
    session = exported(method, {}, 58, 576, 64, tmp_path / f"{method}.onnx")
    for seed in range(2):
        features, prompt, mask = random_inputs(seed)
        np.testing.assert_array_equal(run(session, features, prompt, mask), ORACLES[method](features, prompt, mask, 58))


@pytest.mark.parametrize("method", METHODS)
def test_budgets_smaller_than_method_parameters(method):
    """K = 3 of 64 (keep 0.05 on shapes-llava): below DART's 8 pivots, α·K rounding to the core."""
    features, prompt, mask = random_inputs(5, batch=2, n=64, d=32)
    indices = make_selector(method, {})(*map(torch.from_numpy, (features, prompt, mask)), 3).sort(-1).values.numpy()
    np.testing.assert_array_equal(indices, ORACLES[method](features, prompt, mask, 3))


def test_cdpruner_graph_matches_determinant_oracle(tmp_path):
    """The oracle maximises explicit log-determinants, so it runs at a smaller scale."""
    session = exported("cdpruner", {}, 12, 64, 32, tmp_path / "cdpruner.onnx")
    for seed in range(3):
        features, prompt, mask = random_inputs(seed, n=64, d=32)
        np.testing.assert_array_equal(run(session, features, prompt, mask), cdpruner_oracle(features, prompt, mask, 12))


def test_cdpruner_graph_runs_at_llava_scale(tmp_path):
    session = exported("cdpruner", {}, 58, 576, 256, tmp_path / "cdpruner.onnx")
    features, prompt, mask = random_inputs(4, d=256)
    indices = run(session, features, prompt, mask)
    assert indices.shape == (2, 58) and (np.diff(indices, axis=1) > 0).all()


def test_prompt_aware_methods_follow_the_question():
    """Change only the question: zspa and cdpruner change their choice, the others do not."""
    features, prompt, mask = random_inputs(3, batch=1)
    other = np.random.default_rng(99).standard_normal(prompt.shape).astype(np.float32)
    for method in METHODS:
        selector = make_selector(method, {})
        picks = [selector(*map(torch.from_numpy, (features, p, mask)), 58).sort(-1).values for p in (prompt, other)]
        assert torch.equal(picks[0], picks[1]) == (method not in ("zspa", "cdpruner")), method


def test_unknown_methods_and_parameters_are_refused():
    with pytest.raises(InvalidInputError, match="unknown pruning method 'fastv'"):
        make_selector("fastv", {})
    with pytest.raises(InvalidInputError, match="takes no parameter"):
        make_selector("uniform", {"seed": 1})
    with pytest.raises(InvalidInputError, match="pooling"):
        make_selector("zspa", {"pooling": "median"})
