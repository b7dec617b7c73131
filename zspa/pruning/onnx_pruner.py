"""Pruner graphs whose budget is chosen per request: N dynamic, K an input (DESIGN §4, §5).

K = max(1, round(keep·N)) depends on the image (Qwen2.5-VL's N grows with it) and on the keep a
request asks for, so the greedy steps cannot be unrolled at export time as the traced torch
selectors are. These graphs are written directly in ONNX: each greedy step is one iteration of
an ONNX `Loop` whose trip count comes from the `budget` input, its state the score vector and a
[B,K] buffer of picks filled by ScatterElements. ArgMax/ArgMin take the first extreme, so ties
go to the lower index exactly as in the unrolled graphs and the numpy oracles.

Contract: `image_features` f[B,N,D], `prompt_embeds` f[B,T,D], `prompt_mask` i64[B,T],
`budget` i64[1] (K, computed by the runtime with `zspa.pruning.budget.token_budget`) →
`kept_features` f[B,K,D], `kept_indices` i64[B,K] ascending.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from zspa.pruning import METHOD_DEFAULTS
from zspa.pruning.random_order import HASH_MODULUS, HASH_MULTIPLIER

_ELEM = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
# A greedy loop's state: float scores [B,N] and the int64 picks buffer [B,K].
_STATE = (TensorProto.FLOAT, TensorProto.INT64)
# CDPruner's: residual variances, struck-out picks, the Cholesky rows [B,K,N], the picks buffer.
_DPP_STATE = (TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.INT64)


class _Graph:
    """A tiny builder: `op` appends a node and returns its output name(s)."""

    _ids = itertools.count()

    def __init__(self, subgraph: bool = False):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.subgraph = subgraph  # Loop bodies hold Constant nodes, not initializers

    def _name(self, hint: str) -> str:
        return f"{hint}_{next(self._ids)}"

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs) -> str | list[str]:
        names = [self._name(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    def const(self, value, dtype=np.int64) -> str:
        tensor = np.asarray(value, dtype=dtype)
        if self.subgraph:
            return self.op("Constant", value=numpy_helper.from_array(tensor))
        name = self._name("const")
        self.initializers.append(numpy_helper.from_array(tensor, name))
        return name


def _normalise(g: _Graph, x: str) -> str:
    """x / max(‖x‖, 1e-12) along the last axis (torch's F.normalize)."""
    norm = g.op("ReduceL2", x, g.const([-1]), keepdims=1)
    return g.op("Div", x, g.op("Max", norm, g.const(1e-12, np.float32)))


def _gather_rows(g: _Graph, tokens: str, indices: str, hidden: str) -> str:
    """tokens [B,N,D] at indices [B,M] → [B,M,D]."""
    index = g.op("Unsqueeze", indices, g.const([-1]))
    shape = g.op("Concat", g.op("Shape", indices), hidden, axis=0)
    return g.op("GatherElements", tokens, g.op("Expand", index, shape), axis=1)


class _Pruner:
    """Shared prologue (normalised tokens, K, the picks buffer) and the two greedy loops."""

    def __init__(self, g: _Graph):
        self.g = g
        features = g.op("Cast", "image_features", to=TensorProto.FLOAT)
        self.features = features
        self.tokens = _normalise(g, features)
        self.tokens_t = g.op("Transpose", self.tokens, perm=[0, 2, 1])
        shape = g.op("Shape", features)
        self.batch = g.op("Slice", shape, g.const([0]), g.const([1]))
        self.count = g.op("Slice", shape, g.const([1]), g.const([2]))  # N, [1]
        self.hidden = g.op("Slice", shape, g.const([2]), g.const([3]))
        self.k = "budget"  # [1]
        self.picks = g.op("ConstantOfShape", g.op("Concat", self.batch, self.k, axis=0),
                          value=numpy_helper.from_array(np.zeros(1, np.int64)))

    def top_loop(self, scores: str, steps: str, offset: str) -> str:
        """`steps` [1] times: take the highest score (first on ties), strike it out, write the pick at
        column offset + i of the picks buffer. Returns the scores with the picks struck out."""
        body = _Graph(subgraph=True)
        scores_in, picks_in = "scores_in", "picks_in"
        pick = body.op("ArgMax", scores_in, axis=1, keepdims=1)
        struck = body.op("Expand", body.const([[-np.inf]], np.float32), body.op("Shape", pick))
        scores_out = body.op("ScatterElements", scores_in, pick, struck, axis=1)
        picks_out = self._write_pick(body, picks_in, pick, offset)
        scores, self.picks = self._loop(body, steps, [scores, self.picks], [scores_in, picks_in],
                                        [scores_out, picks_out])
        return scores

    def fill_loop(self, seeds: str, steps: str, offset: str) -> None:
        """Max–min diversity seeded with `seeds` [B,S]: `steps` times take the token whose highest
        cosine similarity to the chosen set is lowest (its minimum distance highest)."""
        g, body = self.g, _Graph(subgraph=True)
        seed_vectors = _gather_rows(g, self.tokens, seeds, self.hidden)
        closeness = g.op("ReduceMax", g.op("MatMul", seed_vectors, self.tokens_t), g.const([1]), keepdims=0)
        closeness = g.op("ScatterElements", closeness, seeds,
                         g.op("Expand", g.const([[np.inf]], np.float32), g.op("Shape", seeds)), axis=1)
        closeness_in, picks_in = "closeness_in", "picks_in"
        pick = body.op("ArgMin", closeness_in, axis=1, keepdims=1)
        vector = _gather_rows(body, self.tokens, pick, self.hidden)
        similarity = body.op("Squeeze", body.op("MatMul", vector, self.tokens_t), body.const([1]))
        struck = body.op("Expand", body.const([[np.inf]], np.float32), body.op("Shape", pick))
        closeness_out = body.op("ScatterElements", body.op("Max", closeness_in, similarity), pick, struck, axis=1)
        picks_out = self._write_pick(body, picks_in, pick, offset)
        _, self.picks = self._loop(body, steps, [closeness, self.picks], [closeness_in, picks_in],
                                   [closeness_out, picks_out])

    @staticmethod
    def _write_pick(body: _Graph, picks: str, pick: str, offset: str) -> str:
        column = body.op("Expand", body.op("Add", "iteration", offset), body.op("Shape", pick))
        return body.op("ScatterElements", picks, column, pick, axis=1)

    def _loop(self, body: _Graph, steps: str, initial: list[str], inputs: list[str], outputs: list[str],
              state: tuple[int, ...] = None):
        state = state or _STATE
        g = self.g
        condition = body.op("Identity", "condition_in")
        graph = helper.make_graph(
            body.nodes, g._name("greedy_step"),
            [helper.make_tensor_value_info("iteration", TensorProto.INT64, []),
             helper.make_tensor_value_info("condition_in", TensorProto.BOOL, []),
             *[helper.make_tensor_value_info(name, kind, None) for name, kind in zip(inputs, state)]],
            [helper.make_tensor_value_info(condition, TensorProto.BOOL, []),
             *[helper.make_tensor_value_info(name, kind, None) for name, kind in zip(outputs, state)]],
        )
        trip = g.op("Squeeze", steps, g.const([0]))
        return g.op("Loop", trip, g.const(True, np.bool_), *initial, outputs=len(initial), body=graph)

    def seeds(self, count: str) -> str:
        return self.g.op("Slice", self.picks, self.g.const([0]), count, self.g.const([1]))


def _relevance(p: _Pruner, pooling: str) -> str:
    """r_i = cos(v_i, mean question embedding), or max over question tokens (DESIGN §5 step 1)."""
    g = p.g
    embeds = g.op("Cast", "prompt_embeds", to=TensorProto.FLOAT)
    mask = g.op("Unsqueeze", g.op("Cast", "prompt_mask", to=TensorProto.FLOAT), g.const([-1]))
    if pooling == "mean":
        total = g.op("ReduceSum", g.op("Mul", embeds, mask), g.const([1]), keepdims=0)
        pooled = g.op("Div", total, g.op("Max", g.op("ReduceSum", mask, g.const([1]), keepdims=0),
                                         g.const(1.0, np.float32)))
        query = g.op("Unsqueeze", _normalise(g, pooled), g.const([-1]))
        return g.op("Squeeze", g.op("MatMul", p.tokens, query), g.const([-1]))
    cosines = g.op("MatMul", p.tokens, g.op("Transpose", _normalise(g, embeds), perm=[0, 2, 1]))
    outside = g.op("Equal", g.op("Transpose", mask, perm=[0, 2, 1]), g.const(0.0, np.float32))
    masked = g.op("Where", outside, g.const(-np.inf, np.float32), cosines)
    return g.op("ReduceMax", masked, g.const([-1]), keepdims=0)


def _round_half_up_int(g: _Graph, value: str) -> str:
    return g.op("Cast", g.op("Floor", g.op("Add", value, g.const(0.5, np.float32))), to=TensorProto.INT64)


def _zspa(p: _Pruner, relevance_ratio: float, pooling: str) -> None:
    """Core of C = min(K, max(1, round(α·K))) by relevance, then the max–min fill (α·K in float32)."""
    g = p.g
    scaled = g.op("Mul", g.op("Cast", p.k, to=TensorProto.FLOAT), g.const(relevance_ratio, np.float32))
    core = g.op("Min", p.k, g.op("Max", g.const([1]), _round_half_up_int(g, scaled)))
    p.top_loop(_relevance(p, pooling), core, g.const(0))
    p.fill_loop(p.seeds(core), g.op("Sub", p.k, core), g.op("Squeeze", core, g.const([0])))


def _divprune(p: _Pruner) -> None:
    """Seeded with the most isolated token (largest distance to its nearest neighbour)."""
    g = p.g
    similarity = g.op("MatMul", p.tokens, p.tokens_t)
    distance = g.op("Sub", g.const(1.0, np.float32), similarity)
    distance = g.op("Where", g.op("Cast", _identity(p), to=TensorProto.BOOL), g.const(np.inf, np.float32), distance)
    isolation = g.op("ReduceMin", distance, g.const([-1]), keepdims=0)
    p.top_loop(isolation, g.const([1]), g.const(0))
    p.fill_loop(p.seeds(g.const([1])), g.op("Sub", p.k, g.const([1])), g.const(1))


def _dart(p: _Pruner, pivots: int) -> None:
    """Pivots by feature norm, then the tokens least similar to any pivot (see baselines.DartSelector)."""
    g = p.g
    count = g.op("Min", p.k, g.const([pivots]))
    norms = g.op("ReduceL2", p.features, g.const([-1]), keepdims=0)
    p.top_loop(norms, count, g.const(0))
    chosen = p.seeds(count)
    duplication = g.op("ReduceMax", g.op("MatMul", _gather_rows(g, p.tokens, chosen, p.hidden), p.tokens_t),
                       g.const([1]), keepdims=0)
    scores = g.op("ScatterElements", g.op("Neg", duplication), chosen,
                  g.op("Expand", g.const([[-np.inf]], np.float32), g.op("Shape", chosen)), axis=1)
    p.top_loop(scores, g.op("Sub", p.k, count), g.op("Squeeze", count, g.const([0])))


def _cdpruner(p: _Pruner) -> None:
    """Greedy MAP of the conditional DPP (see baselines.CDPrunerSelector): K steps, each adding the
    token of largest residual variance and appending its row of the incremental Cholesky factor
    to a [B,K,N] buffer; step t reads only the t rows written so far."""
    g, body = p.g, _Graph(subgraph=True)
    relevance = _relevance(p, "mean")
    low = g.op("ReduceMin", relevance, g.const([-1]), keepdims=1)
    span = g.op("Max", g.op("Sub", g.op("ReduceMax", relevance, g.const([-1]), keepdims=1), low),
                g.const(1e-6, np.float32))
    weight = g.op("Div", g.op("Sub", relevance, low), span)
    similarity = g.op("MatMul", p.tokens, p.tokens_t)
    kernel = g.op("Mul", g.op("Mul", g.op("Unsqueeze", weight, g.const([-1])), similarity),
                  g.op("Unsqueeze", weight, g.const([1])))
    residual = g.op("ReduceSum", g.op("Mul", kernel, _identity(p)), g.const([-1]), keepdims=0)
    factors = _zeros(g, g.op("Concat", p.batch, p.k, p.count, axis=0))
    struck = _zeros(g, g.op("Shape", residual))

    names = ["residual_in", "struck_in", "factors_in", "picks_in"]
    residual_in, struck_in, factors_in, picks_in = names
    pick = body.op("ArgMax", body.op("Add", residual_in, struck_in), axis=1, keepdims=1)  # [B,1]
    batch_n = body.op("Shape", residual_in)  # [B, N]
    row_shape = body.op("Concat", body.op("Slice", batch_n, body.const([0]), body.const([1])), body.const([1]),
                        body.op("Slice", batch_n, body.const([1]), body.const([2])), axis=0)  # [B, 1, N]
    row = body.op("GatherElements", kernel, body.op("Expand", body.op("Unsqueeze", pick, body.const([-1])), row_shape),
                  axis=1)
    written = body.op("Slice", factors_in, body.const([0]), body.op("Unsqueeze", "iteration", body.const([0])),
                      body.const([1]))  # [B,t,N]
    column_shape = body.op("Concat", body.op("Slice", body.op("Shape", written), body.const([0]), body.const([2])),
                           body.const([1]), axis=0)  # [B, t, 1]
    at_pick = body.op("GatherElements", written, body.op("Expand", body.op("Unsqueeze", pick, body.const([1])),
                                                         column_shape), axis=2)
    row = body.op("Sub", body.op("Squeeze", row, body.const([1])),
                  body.op("ReduceSum", body.op("Mul", at_pick, written), body.const([1]), keepdims=0))
    chosen_variance = body.op("GatherElements", residual_in, pick, axis=1)
    factor = body.op("Div", row, body.op("Sqrt", body.op("Max", chosen_variance, body.const(1e-10, np.float32))))
    row_index = body.op("Expand", body.op("Reshape", "iteration", body.const([1, 1, 1])), row_shape)
    factors_out = body.op("ScatterElements", factors_in, row_index, body.op("Unsqueeze", factor, body.const([1])),
                          axis=1)
    residual_out = body.op("Sub", residual_in, body.op("Mul", factor, factor))
    struck_out = body.op("ScatterElements", struck_in, pick,
                         body.op("Expand", body.const([[-np.inf]], np.float32), body.op("Shape", pick)), axis=1)
    picks_out = p._write_pick(body, picks_in, pick, g.const(0))
    *_, p.picks = p._loop(body, p.k, [residual, struck, factors, p.picks], names,
                          [residual_out, struck_out, factors_out, picks_out], _DPP_STATE)


def _zeros(g: _Graph, shape: str) -> str:
    return g.op("ConstantOfShape", shape, value=numpy_helper.from_array(np.zeros(1, np.float32)))


def _identity(p: _Pruner) -> str:
    """float [N,N] identity for the image's N."""
    return p.g.op("EyeLike", _zeros(p.g, p.g.op("Concat", p.count, p.count, axis=0)))


def _order(p: _Pruner, keys: str) -> None:
    """Picks the K tokens of smallest integer key (a fixed order: uniform and random)."""
    g = p.g
    row = g.op("Unsqueeze", keys, g.const([0]))
    expanded = g.op("Expand", row, g.op("Concat", p.batch, p.count, axis=0))
    p.picks = g.op("TopK", expanded, p.k, axis=1, largest=0, sorted=1, outputs=2)[1]


def _positions(p: _Pruner) -> str:
    g = p.g
    return g.op("Range", g.const(0), g.op("Squeeze", p.count, g.const([0])), g.const(1))


def _uniform(p: _Pruner) -> None:
    """Token ⌊(i + ½)·N/K⌋ for i < K, in exact integer arithmetic: ⌊(2i + 1)·N / 2K⌋."""
    g = p.g
    k = g.op("Squeeze", p.k, g.const([0]))
    steps = g.op("Range", g.const(0), k, g.const(1))
    numerator = g.op("Mul", g.op("Add", g.op("Mul", steps, g.const(2)), g.const(1)),
                     g.op("Squeeze", p.count, g.const([0])))
    picks = g.op("Div", numerator, g.op("Mul", k, g.const(2)))
    p.picks = g.op("Expand", g.op("Unsqueeze", picks, g.const([0])), g.op("Concat", p.batch, p.k, axis=0))


def _random(p: _Pruner, seed: int) -> None:
    g = p.g
    keys = g.op("Mod", g.op("Add", g.op("Mul", _positions(p), g.const(HASH_MULTIPLIER)), g.const(seed)),
                g.const(HASH_MODULUS))
    _order(p, keys)


_BUILDERS: dict[str, Callable[..., None]] = {
    "zspa": _zspa, "divprune": _divprune, "uniform": _uniform, "random": _random, "dart": _dart,
    "cdpruner": _cdpruner,
}


def build_pruner(method: str, params: dict, *, hidden: int, dtype: str = "float32", opset: int = 18) -> onnx.ModelProto:
    """The per-request pruner graph of `method` with `params` (validated by `make_selector`)."""
    g = _Graph()
    p = _Pruner(g)
    _BUILDERS[method](p, **{**METHOD_DEFAULTS[method], **params})
    kept_indices = g.op("TopK", p.picks, p.k, axis=1, largest=0, sorted=1, outputs=2)[0]
    g.nodes.append(helper.make_node("Identity", [kept_indices], ["kept_indices"]))
    g.nodes.append(helper.make_node("Identity", [_gather_rows(g, "image_features", kept_indices, p.hidden)],
                                    ["kept_features"]))
    elem = _ELEM[dtype]
    graph = helper.make_graph(
        g.nodes, f"pruner_{method}",
        [helper.make_tensor_value_info("image_features", elem, ["batch_size", "num_visual_tokens", hidden]),
         helper.make_tensor_value_info("prompt_embeds", elem, ["batch_size", "prompt_length", hidden]),
         helper.make_tensor_value_info("prompt_mask", TensorProto.INT64, ["batch_size", "prompt_length"]),
         helper.make_tensor_value_info("budget", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("kept_features", elem, ["batch_size", "num_kept_tokens", hidden]),
         helper.make_tensor_value_info("kept_indices", TensorProto.INT64, ["batch_size", "num_kept_tokens"])],
        initializer=g.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="zspa")
    onnx.checker.check_model(model, full_check=True)
    return model


def save_pruner(method: str, params: dict, path: Path, *, hidden: int, dtype: str = "float32", opset: int = 18) -> None:
    onnx.save(build_pruner(method, params, hidden=hidden, dtype=dtype, opset=opset), str(path))
