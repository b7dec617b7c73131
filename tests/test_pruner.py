"""ZSPAPrune (DESIGN §5): the per-request graph against the numpy oracle, and properties of the method."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zspa.pruning.budget import core_size, token_budget
from zspa.pruning.onnx_pruner import build_pruner

from oracles import zspa_oracle
from torch_pruners import PrunerGraph, ZSPASelector, question_relevance

N, D, K = 576, 64, 58


def pruner_graph(method: str, params: dict, d: int = D) -> ort.InferenceSession:
    """The per-request graph zspa-export writes for `method`, loaded in onnxruntime."""
    model = build_pruner(method, params, hidden=d)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def random_inputs(seed, batch=2, n=N, d=D, t=9):
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((batch, n, d)).astype(np.float32)
    prompt = rng.standard_normal((batch, t, d)).astype(np.float32)
    mask = (rng.random((batch, t)) < 0.6).astype(np.int64)
    mask[:, 0] = 1  # at least one question token
    return features, prompt, mask


def run(session, features, prompt, mask, k=K):
    return session.run(None, {"image_features": features, "prompt_embeds": prompt, "prompt_mask": mask,
                              "budget": np.array([k], dtype=np.int64)})


def graph_prune(features, prompt, mask, k, alpha, pooling):
    session = pruner_graph("zspa", {"relevance_ratio": alpha, "pooling": pooling}, d=features.shape[-1])
    return run(session, features, prompt, mask, k)


def torch_prune(features, prompt, mask, k, alpha, pooling):
    """The eager torch module (the PyTorch references' pruner) → numpy (kept, indices)."""
    kept, indices = PrunerGraph(ZSPASelector(alpha, pooling), k)(*map(torch.from_numpy, (features, prompt, mask)))
    return kept.numpy(), indices.numpy()


@pytest.fixture(scope="module", params=["mean", "max"])
def pruner_session(request):
    return request.param, pruner_graph("zspa", {"relevance_ratio": 0.5, "pooling": request.param})


def test_token_budget_rounds_half_up():
    assert token_budget(0.1, 576) == 58
    assert token_budget(0.25, 576) == 144
    assert token_budget(0.0001, 576) == 1
    assert token_budget(1.0, 576) == 576
    assert core_size(58, 0.5) == 29 and core_size(5, 0.5) == 3 and core_size(58, 0.0) == 1


@pytest.mark.parametrize("seed", range(4))
def test_graph_matches_oracle_batch2(pruner_session, seed):
    pooling, session = pruner_session
    features, prompt, mask = random_inputs(seed)
    kept, indices = run(session, features, prompt, mask)
    expected = zspa_oracle(features, prompt, mask, K, 0.5, pooling)
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_array_equal(kept, np.take_along_axis(features, expected[..., None], axis=1))


def test_graph_breaks_ties_towards_lower_index(pruner_session):
    """Duplicated tokens tie exactly, in relevance and in distance; both sides pick the lower index.

    96 distinct vectors with 6 copies each: the core takes whole groups of copies (relevance
    ties), and each diversity step picks among the copies of the farthest group (distance ties).
    """
    pooling, session = pruner_session
    rng = np.random.default_rng(7)
    distinct = rng.standard_normal((2, 96, D)).astype(np.float32)
    features = np.repeat(distinct, N // 96, axis=1)
    prompt = rng.standard_normal((2, 4, D)).astype(np.float32)
    mask = np.ones((2, 4), np.int64)
    _, indices = run(session, features, prompt, mask)
    np.testing.assert_array_equal(indices, zspa_oracle(features, prompt, mask, K, 0.5, pooling))


def test_graph_handles_other_prompt_lengths_and_batch_one(pruner_session):
    pooling, session = pruner_session
    features, prompt, mask = random_inputs(11, batch=1, t=40)
    _, indices = run(session, features, prompt, mask)
    np.testing.assert_array_equal(indices, zspa_oracle(features, prompt, mask, K, 0.5, pooling))


def test_one_graph_serves_every_n_and_k(pruner_session):
    """N of a 336 px LLaVA image and of large Qwen2.5-VL images, keeps from one token to all of them."""
    pooling, session = pruner_session
    for n, keep in [(576, 0.1), (576, 0.37), (2916, 0.1), (1196, 0.25), (7, 1.0), (1, 1.0), (300, 0.001)]:
        features, prompt, mask = random_inputs(n, n=n)
        k = token_budget(keep, n)
        kept, indices = run(session, features, prompt, mask, k)
        np.testing.assert_array_equal(indices, zspa_oracle(features, prompt, mask, k, 0.5, pooling))
        assert kept.shape == (2, k, D)


def test_graph_is_small():
    """A fixed graph: the greedy steps are loop iterations, so its size does not grow with K or N."""
    nodes = len(build_pruner("zspa", {"relevance_ratio": 0.25, "pooling": "mean"}, hidden=D).graph.node)
    size = len(build_pruner("zspa", {"relevance_ratio": 0.25, "pooling": "mean"}, hidden=D).SerializeToString())
    print(f"\nZSPAPrune per-request graph: {nodes} top-level nodes, {size / 1024:.1f} KiB")
    assert nodes < 80 and size < 20_000


selector_cases = st.tuples(
    st.integers(1, 64),  # n
    st.integers(2, 16),  # d
    st.integers(1, 6),  # t
    st.floats(0.0, 1.0),  # alpha
    st.sampled_from(["mean", "max"]),
    st.integers(0, 2**31 - 1),  # seed
)


@settings(max_examples=60, deadline=None)
@given(selector_cases, st.floats(0.01, 1.0))
def test_kept_indices_are_unique_ascending_in_range(case, keep):
    n, d, t, alpha, pooling, seed = case
    features, prompt, mask = random_inputs(seed, batch=2, n=n, d=d, t=t)
    k = token_budget(keep, n)
    kept, indices = graph_prune(features, prompt, mask, k, alpha, pooling)
    assert indices.shape == (2, k)
    assert (np.diff(indices, axis=1) > 0).all()  # unique and ascending
    assert indices.min() >= 0 and indices.max() < n
    np.testing.assert_array_equal(kept, np.take_along_axis(features, indices[..., None], axis=1))
    np.testing.assert_array_equal(indices, zspa_oracle(features, prompt, mask, k, alpha, pooling))
    np.testing.assert_array_equal(torch_prune(features, prompt, mask, k, alpha, pooling)[1], indices)


@settings(max_examples=30, deadline=None)
@given(selector_cases)
def test_full_budget_keeps_every_token(case):
    n, d, t, alpha, pooling, seed = case
    features, prompt, mask = random_inputs(seed, batch=1, n=n, d=d, t=t)
    _, indices = graph_prune(features, prompt, mask, n, alpha, pooling)
    np.testing.assert_array_equal(indices[0], np.arange(n))


def _relevance(features, prompt, mask, pooling):
    tokens = torch.nn.functional.normalize(torch.from_numpy(features), dim=-1)
    return question_relevance(tokens, torch.from_numpy(prompt), torch.from_numpy(mask), pooling).numpy()


@settings(max_examples=40, deadline=None)
@given(selector_cases, st.floats(0.05, 1.0))
def test_alpha_one_is_relevance_top_k(case, keep):
    n, d, t, _, pooling, seed = case
    features, prompt, mask = random_inputs(seed, batch=1, n=n, d=d, t=t)
    k = token_budget(keep, n)
    indices = np.sort(graph_prune(features, prompt, mask, k, 1.0, pooling)[1][0])
    relevance = _relevance(features, prompt, mask, pooling)[0]
    expected = np.sort(np.argsort(-relevance, kind="stable")[:k])
    np.testing.assert_array_equal(indices, expected)


@settings(max_examples=40, deadline=None)
@given(selector_cases, st.floats(0.05, 1.0))
def test_core_is_contained_in_kept(case, keep):
    n, d, t, alpha, pooling, seed = case
    features, prompt, mask = random_inputs(seed, batch=1, n=n, d=d, t=t)
    k = token_budget(keep, n)
    _, kept = graph_prune(features, prompt, mask, k, alpha, pooling)
    relevance = _relevance(features, prompt, mask, pooling)[0]
    core = np.argsort(-relevance, kind="stable")[: core_size(k, alpha)]
    assert set(core) <= set(kept[0].tolist())
