"""Pruner graphs whose budget is chosen per request: N dynamic, K an input (DESIGN §4, §5).

K = max(1, round(keep·N)) depends on the image (Qwen2.5-VL's N grows with it) and on the keep a
request asks for, so the greedy steps cannot be unrolled at export time. These graphs are
written directly in ONNX. A greedy method is one ONNX `Loop` of K
iterations whose trip count comes from the `budget` input; each iteration picks one token and
strikes it out of the scores (−inf) and of the closeness vector (+inf), so no buffer of picks is
carried: the kept set is read off the final state, in ascending order, by one TopK. ArgMax /
ArgMin return the first extreme and TopK orders ties by index, so ties go to the lower index, as
in the numpy oracles. Loop-invariant tensors live outside the body, which holds only per-step work.

Contract: `image_features` f[B,N,D], `prompt_embeds` f[B,T,D], `prompt_mask` i64[B,T],
`budget` i64[1] (K, computed by the runtime with `zspa.pruning.budget.token_budget`) →
`kept_features` f[B,K,D], `kept_indices` i64[B,K] ascending.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from zspa.onnx_ir import declare_oldest_ir_version
from zspa.pruning import DPP_EPSILON
from zspa.pruning.params import method_params
from zspa.pruning.random_order import HASH_MODULUS, HASH_MULTIPLIER

_ELEM = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}


class _Graph:
    """A tiny builder: `op` appends a node and returns its output name(s); `const` adds an initializer.

    A loop body shares its parent's `ids`, so names stay unique across the graph and its bodies, and
    each build numbers from zero: the same method and parameters give the same bytes (a bundle's
    digest must not depend on what the process built before)."""

    def __init__(self, ids: Iterator[int] | None = None):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.ids = ids if ids is not None else itertools.count()

    def name(self, hint: str) -> str:
        return f"{hint}_{next(self.ids)}"

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs) -> str | list[str]:
        names = [self.name(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    def const(self, value, dtype=np.int64) -> str:
        name = self.name("const")
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name


def _normalise(g: _Graph, x: str) -> str:
    """x / max(‖x‖, 1e-12) along the last axis (torch's F.normalize)."""
    norm = g.op("ReduceL2", x, g.const([-1]), keepdims=1)
    return g.op("Div", x, g.op("Max", norm, g.const(1e-12, np.float32)))


class _Pruner:
    """The shared prologue (normalised tokens, N, K) and the greedy loop; a method ends by setting
    `kept` (int64 [B,K], any order) or `picked` (bool [B,N])."""

    def __init__(self, g: _Graph):
        self.g = g
        self.features = g.op("Cast", "image_features", to=TensorProto.FLOAT)
        self.tokens = _normalise(g, self.features)
        self.tokens_t = g.op("Transpose", self.tokens, perm=[0, 2, 1])
        shape = g.op("Shape", self.features)
        self.batch = g.op("Slice", shape, g.const([0]), g.const([1]))
        self.count = g.op("Slice", shape, g.const([1]), g.const([2]))  # N, as [1]
        self.hidden = g.op("Slice", shape, g.const([2]), g.const([3]))
        self.k = "budget"  # K, as [1]
        self.kept: str | None = None
        self.picked: str | None = None

    def column(self, value: float) -> str:
        """float [B,1] filled with `value`: what a pick is struck out with."""
        return self.g.op("Expand", self.g.const([[value]], np.float32),
                         self.g.op("Concat", self.batch, self.g.const([1]), axis=0))

    def rows(self, indices: str) -> str:
        """The normalised tokens at `indices` [B,M] → [B,M,D]."""
        g = self.g
        index = g.op("Expand", g.op("Unsqueeze", indices, g.const([-1])),
                     g.op("Concat", g.op("Shape", indices), self.hidden, axis=0))
        return g.op("GatherElements", self.tokens, index, axis=1)

    def greedy(self, scores: str, core: str) -> None:
        """The `core` [1] highest scores, then max–min diversity seeded with them (DESIGN §5 steps 2–3):
        each further step takes the token least similar to everything taken, updating every token's
        closeness (its highest cosine to the taken set) by one matrix–vector product."""
        g = self.g
        scores = self._loop(g.name("core_step"), core, scores,
                            lambda body, scores_in: body.op("ArgMax", scores_in, axis=1, keepdims=1),
                            self.column(-np.inf))
        seeds = self._first(g.op("Equal", scores, g.const(-np.inf, np.float32)), core)
        closeness = g.op("ReduceMax", g.op("MatMul", self.rows(seeds), self.tokens_t), g.const([1]), keepdims=0)
        closeness = g.op("ScatterElements", closeness, seeds,
                         g.op("Expand", g.const([[np.inf]], np.float32), g.op("Shape", seeds)), axis=1)
        flat = g.op("Reshape", self.tokens, g.op("Concat", g.const([-1]), self.hidden, axis=0))
        offsets = g.op("Mul", g.op("Unsqueeze", g.op("Range", g.const(0), g.op("Squeeze", self.batch, g.const([0])),
                                                      g.const(1)), g.const([-1])),
                       g.op("Squeeze", self.count, g.const([0])))  # row r starts at r·N in `flat`
        squeeze_axis = g.const([1])

        def fill_step(body: _Graph, closeness_in: str) -> tuple[str, str]:
            pick = body.op("ArgMin", closeness_in, axis=1, keepdims=1)  # [B,1]
            vector = body.op("Gather", flat, body.op("Add", pick, offsets), axis=0)  # [B,1,D]
            similarity = body.op("Squeeze", body.op("MatMul", vector, self.tokens_t), squeeze_axis)
            return pick, body.op("Max", closeness_in, similarity)

        closeness = self._loop(g.name("fill_step"), g.op("Sub", self.k, core), closeness, fill_step,
                               self.column(np.inf))
        self.picked = g.op("Equal", closeness, g.const(np.inf, np.float32))

    def _loop(self, name: str, steps: str, state: str, step: Callable, struck: str) -> str:
        """`steps` [1] iterations over a float [B,N] state: `step(body, state)` returns the pick [B,1]
        (and optionally the updated state), and the pick is struck out with `struck` [B,1]."""
        g = self.g
        body = _Graph(g.ids)
        result = step(body, "state_in")
        pick, updated = result if isinstance(result, tuple) else (result, "state_in")
        state_out = body.op("ScatterElements", updated, pick, struck, axis=1)
        graph = helper.make_graph(
            body.nodes, name,
            [helper.make_tensor_value_info("iteration", TensorProto.INT64, []),
             helper.make_tensor_value_info("condition", TensorProto.BOOL, []),
             helper.make_tensor_value_info("state_in", TensorProto.FLOAT, None)],
            [helper.make_tensor_value_info("condition", TensorProto.BOOL, []),
             helper.make_tensor_value_info(state_out, TensorProto.FLOAT, None)],
        )
        return g.op("Loop", g.op("Squeeze", steps, g.const([0])), g.const(True, np.bool_), state, body=graph)

    def _first(self, picked: str, count: str) -> str:
        """The lowest `count` [1] positions where `picked` [B,N] is true, ascending."""
        g = self.g
        positions = g.op("Range", g.const(0), g.op("Squeeze", self.count, g.const([0])), g.const(1))
        keys = g.op("Where", picked, positions, g.op("Add", positions, g.op("Squeeze", self.count, g.const([0]))))
        return g.op("TopK", keys, count, axis=1, largest=0, sorted=1, outputs=2)[0]

    def kept_indices(self) -> str:
        """int64 [B,K], ascending."""
        if self.picked is not None:
            return self._first(self.picked, self.k)
        return self.g.op("TopK", self.kept, self.k, axis=1, largest=0, sorted=1, outputs=2)[0]


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


def _zspa(p: _Pruner, relevance_ratio: float, pooling: str) -> None:
    """Core of C = min(K, max(1, round(α·K))) by relevance, then the max–min fill (α·K in float32)."""
    g = p.g
    scaled = g.op("Add", g.op("Mul", g.op("Cast", p.k, to=TensorProto.FLOAT), g.const(relevance_ratio, np.float32)),
                  g.const(0.5, np.float32))
    core = g.op("Min", p.k, g.op("Max", g.const([1]), g.op("Cast", g.op("Floor", scaled), to=TensorProto.INT64)))
    p.greedy(_relevance(p, pooling), core)


def _similarity(p: _Pruner) -> str:
    return p.g.op("MatMul", p.tokens, p.tokens_t)


def _identity(p: _Pruner) -> str:
    """bool [N,N] identity for the image's N."""
    g = p.g
    zeros = g.op("ConstantOfShape", g.op("Concat", p.count, p.count, axis=0),
                 value=numpy_helper.from_array(np.zeros(1, np.float32)))
    return g.op("Cast", g.op("EyeLike", zeros), to=TensorProto.BOOL)


def _divprune(p: _Pruner) -> None:
    """Seeded with the most isolated token (largest distance to its nearest neighbour)."""
    g = p.g
    distance = g.op("Sub", g.const(1.0, np.float32), _similarity(p))
    distance = g.op("Where", _identity(p), g.const(np.inf, np.float32), distance)
    p.greedy(g.op("ReduceMin", distance, g.const([-1]), keepdims=0), g.const([1]))


def _dart(p: _Pruner, pivots: int) -> None:
    """Pivots by feature norm, then the tokens least similar to any pivot.
    Neither step is greedy: two TopKs, whose ties go to the lower index."""
    g = p.g
    count = g.op("Min", p.k, g.const([pivots]))
    norms = g.op("ReduceL2", p.features, g.const([-1]), keepdims=0)
    chosen = g.op("TopK", norms, count, axis=1, largest=1, sorted=1, outputs=2)[1]
    duplication = g.op("ReduceMax", g.op("MatMul", p.rows(chosen), p.tokens_t), g.const([1]), keepdims=0)
    duplication = g.op("ScatterElements", duplication, chosen,
                       g.op("Expand", g.const([[np.inf]], np.float32), g.op("Shape", chosen)), axis=1)
    rest = g.op("TopK", duplication, g.op("Sub", p.k, count), axis=1, largest=0, sorted=1, outputs=2)[1]
    p.kept = g.op("Concat", chosen, rest, axis=1)


def _cdpruner(p: _Pruner) -> None:
    """Greedy MAP of the conditional DPP: K steps, each adding the
    token of largest residual variance and writing its row of the incremental Cholesky factor into a
    [B,K,N] buffer; step t reads only the t rows written so far."""
    g = p.g
    body = _Graph(g.ids)
    relevance = _relevance(p, "mean")
    low = g.op("ReduceMin", relevance, g.const([-1]), keepdims=1)
    span = g.op("Max", g.op("Sub", g.op("ReduceMax", relevance, g.const([-1]), keepdims=1), low),
                g.const(1e-6, np.float32))
    weight = g.op("Div", g.op("Sub", relevance, low), span)
    kernel = g.op("Mul", g.op("Mul", g.op("Unsqueeze", weight, g.const([-1])), _similarity(p)),
                  g.op("Unsqueeze", weight, g.const([1])))
    residual = g.op("ReduceSum", g.op("Where", _identity(p), kernel, g.const(0.0, np.float32)), g.const([-1]),
                    keepdims=0)
    factors = g.op("ConstantOfShape", g.op("Concat", p.batch, p.k, p.count, axis=0),
                   value=numpy_helper.from_array(np.zeros(1, np.float32)))
    row_shape = g.op("Concat", p.batch, g.const([1]), p.count, axis=0)  # [B,1,N]
    negative, zero, one, axis = p.column(-np.inf), g.const([0]), g.const([1]), g.const([1])

    pick = body.op("ArgMax", "residual_in", axis=1, keepdims=1)  # chosen tokens hold −inf: never again
    row = body.op("GatherElements", kernel, body.op("Expand", body.op("Unsqueeze", pick, axis), row_shape), axis=1)
    written = body.op("Slice", "factors_in", zero, body.op("Unsqueeze", "iteration", zero), one)  # [B,t,N]
    column_shape = body.op("Concat", body.op("Slice", body.op("Shape", written), zero, g.const([2])), one, axis=0)
    at_pick = body.op("GatherElements", written, body.op("Expand", body.op("Unsqueeze", pick, axis), column_shape),
                      axis=2)  # [B,t,1]
    row = body.op("Sub", body.op("Squeeze", row, axis), body.op("ReduceSum", body.op("Mul", at_pick, written), axis,
                                                                keepdims=0))
    variance = body.op("GatherElements", "residual_in", pick, axis=1)
    epsilon = g.const(DPP_EPSILON, np.float32)  # a spent direction updates nothing
    factor = body.op("Where", body.op("Greater", variance, epsilon),
                     body.op("Div", row, body.op("Sqrt", body.op("Max", variance, epsilon))), g.const(0.0, np.float32))
    rows_at_t = body.op("Expand", body.op("Reshape", "iteration", g.const([1, 1, 1])), row_shape)
    factors_out = body.op("ScatterElements", "factors_in", rows_at_t, body.op("Unsqueeze", factor, axis), axis=1)
    residual_out = body.op("ScatterElements", body.op("Sub", "residual_in", body.op("Mul", factor, factor)), pick,
                           negative, axis=1)
    condition = body.op("Identity", "condition_in")
    graph = helper.make_graph(
        body.nodes, g.name("dpp_step"),
        [helper.make_tensor_value_info("iteration", TensorProto.INT64, []),
         helper.make_tensor_value_info("condition_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("residual_in", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("factors_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info(condition, TensorProto.BOOL, []),
         helper.make_tensor_value_info(residual_out, TensorProto.FLOAT, None),
         helper.make_tensor_value_info(factors_out, TensorProto.FLOAT, None)],
    )
    final, _ = g.op("Loop", g.op("Squeeze", p.k, g.const([0])), g.const(True, np.bool_), residual, factors,
                    outputs=2, body=graph)
    p.picked = g.op("Equal", final, g.const(-np.inf, np.float32))


def _fixed_order(p: _Pruner, keys: str) -> None:
    """The K tokens of smallest integer key, the same for every image (uniform and random)."""
    g = p.g
    expanded = g.op("Expand", g.op("Unsqueeze", keys, g.const([0])), g.op("Concat", p.batch, p.count, axis=0))
    p.kept = g.op("TopK", expanded, p.k, axis=1, largest=0, sorted=1, outputs=2)[1]


def _uniform(p: _Pruner) -> None:
    """Token ⌊(i + ½)·N/K⌋ for i < K, in exact integer arithmetic: ⌊(2i + 1)·N / 2K⌋."""
    g = p.g
    k = g.op("Squeeze", p.k, g.const([0]))
    steps = g.op("Range", g.const(0), k, g.const(1))
    numerator = g.op("Mul", g.op("Add", g.op("Mul", steps, g.const(2)), g.const(1)),
                     g.op("Squeeze", p.count, g.const([0])))
    picks = g.op("Div", numerator, g.op("Mul", k, g.const(2)))
    p.kept = g.op("Expand", g.op("Unsqueeze", picks, g.const([0])), g.op("Concat", p.batch, p.k, axis=0))


def _random(p: _Pruner, seed: int) -> None:
    """`random_order`'s hash of each position, computed in the graph for the image's N."""
    g = p.g
    positions = g.op("Range", g.const(0), g.op("Squeeze", p.count, g.const([0])), g.const(1))
    keys = g.op("Mod", g.op("Add", g.op("Mul", positions, g.const(HASH_MULTIPLIER)), g.const(seed)),
                g.const(HASH_MODULUS))
    _fixed_order(p, keys)


_BUILDERS: dict[str, Callable[..., None]] = {
    "zspa": _zspa, "divprune": _divprune, "uniform": _uniform, "random": _random, "dart": _dart,
    "cdpruner": _cdpruner,
}


def build_pruner(method: str, params: dict, *, hidden: int, dtype: str = "float32", opset: int = 18) -> onnx.ModelProto:
    """The per-request pruner graph of `method` with `params` over its defaults."""
    checked = method_params(method, params)  # before anything is built: the name, then the values
    g = _Graph()
    p = _Pruner(g)
    _BUILDERS[method](p, **checked)
    kept_indices = p.kept_indices()
    index = g.op("Expand", g.op("Unsqueeze", kept_indices, g.const([-1])),
                 g.op("Concat", g.op("Shape", kept_indices), p.hidden, axis=0))
    g.nodes += [helper.make_node("Identity", [kept_indices], ["kept_indices"]),
                helper.make_node("GatherElements", ["image_features", index], ["kept_features"], axis=1)]
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
    declare_oldest_ir_version(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def save_pruner(method: str, params: dict, path: Path, *, hidden: int, dtype: str = "float32", opset: int = 18) -> None:
    onnx.save(build_pruner(method, params, hidden=hidden, dtype=dtype, opset=opset), str(path))
