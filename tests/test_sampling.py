"""Next-token choice: greedy, temperature, top-k, top-p, seeds."""

from __future__ import annotations

import numpy as np
import pytest

from zspa.errors import InvalidInputError
from zspa.runtime.sampling import SamplingParams, next_token

LOGITS = np.array([0.1, 3.0, 2.9, -1.0, 0.5], dtype=np.float32)


def draws(params, n=400, seed=0):
    rng = np.random.default_rng(seed)
    return [next_token(LOGITS, params, rng) for _ in range(n)]


def test_greedy_is_argmax():
    assert next_token(LOGITS, SamplingParams(), np.random.default_rng()) == 1


def test_top_k_one_and_tiny_top_p_are_greedy():
    assert set(draws(SamplingParams(temperature=1.0, top_k=1))) == {1}
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.01))) == {1}


def test_top_k_limits_the_support():
    assert set(draws(SamplingParams(temperature=5.0, top_k=2))) == {1, 2}


def test_top_p_keeps_smallest_set_reaching_mass():
    # at temperature 1 tokens 1 and 2 hold ~0.8 of the mass; p=0.75 needs both, never the rest
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.75))) == {1, 2}


def test_sampling_follows_the_distribution():
    counts = np.bincount(draws(SamplingParams(temperature=1.0), n=4000), minlength=5) / 4000
    probs = np.exp(LOGITS - LOGITS.max()) / np.exp(LOGITS - LOGITS.max()).sum()
    np.testing.assert_allclose(counts, probs, atol=0.03)


def test_seed_reproduces_samples():
    params = SamplingParams(temperature=2.0)
    assert draws(params, seed=5) == draws(params, seed=5)
    assert draws(params, seed=5) != draws(params, seed=6)


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"temperature": float("nan")}, {"top_p": 0},
                                    {"top_p": 1.5}, {"top_k": -2}])
def test_invalid_parameters_are_refused(kwargs):
    with pytest.raises(InvalidInputError):
        SamplingParams(**kwargs)


def test_tiny_temperatures_are_greedy_and_bad_seeds_refused():
    """logits / 1e-300 overflows to inf and inf − inf is nan: below 1e-5 sampling is greedy."""
    logits = np.array([0.5, 3.0, 1.0])
    for temperature in (1e-300, 5e-324, 9e-6):
        assert next_token(logits, SamplingParams(temperature=temperature, seed=1), np.random.default_rng(1)) == 1
    for seed in (-1, 2**63, 1.5):
        with pytest.raises(InvalidInputError, match="seed must be an integer"):
            SamplingParams(temperature=1.0, seed=seed)
