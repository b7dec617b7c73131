"""Full attention over an image's patches on onnxruntime CPU, three ways: the primitive pattern
(MatMul → Softmax → MatMul, every head's P×P scores materialised), onnxruntime's fused
`com.microsoft.MultiHeadAttention` (what zspa's Qwen vision graphs use) and ONNX opset-23
`Attention`. P = 784, 2352 and 3600 patches (448², 896×672 and 1280×720 at 16 px), 16 heads of 64
(Qwen3-VL-2B's tower). Time per attention and the peak memory it adds.

Each side runs in its own process; the sides alternate over `--rounds`; figures are the median
(min, max) of the per-round medians.

    python benchmarks/vision_attention.py [--rounds 3] [--runs 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from isolation import median_ms, ratios, run_worker, spread  # noqa: E402
from machine import describe_machine  # noqa: E402

HEADS, HEAD_DIM = 16, 64
PATCHES = {"448x448": 784, "896x672": 2352, "1280x720": 3600}
SIDES = ("primitive", "MultiHeadAttention", "Attention-23")


def attention_graph(side: str) -> bytes:
    """q, k, v [1, P, heads·64] → [1, P, heads·64] as `side` spells it."""
    from onnx import TensorProto, helper

    scale = HEAD_DIM**-0.5
    initializers, opsets = [], [helper.make_opsetid("", 18)]
    if side == "MultiHeadAttention":
        nodes = [helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["out"], domain="com.microsoft",
                                  num_heads=HEADS, scale=scale)]
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    elif side == "Attention-23":
        nodes = [helper.make_node("Attention", ["q", "k", "v"], ["out"], q_num_heads=HEADS, kv_num_heads=HEADS,
                                  scale=scale)]
        opsets = [helper.make_opsetid("", 23)]
    else:
        initializers = [helper.make_tensor("heads", TensorProto.INT64, [4], [1, -1, HEADS, HEAD_DIM]),
                        helper.make_tensor("flat", TensorProto.INT64, [3], [1, -1, HEADS * HEAD_DIM]),
                        helper.make_tensor("scale", TensorProto.FLOAT, [], [scale])]
        nodes = [*(node for name, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])) for node in (
                     helper.make_node("Reshape", [name, "heads"], [f"{name}4"]),
                     helper.make_node("Transpose", [f"{name}4"], [f"{name}t"], perm=perm))),
                 helper.make_node("MatMul", ["qt", "kt"], ["products"]),
                 helper.make_node("Mul", ["products", "scale"], ["scores"]),
                 helper.make_node("Softmax", ["scores"], ["weights"], axis=-1),
                 helper.make_node("MatMul", ["weights", "vt"], ["context"]),
                 helper.make_node("Transpose", ["context"], ["context_t"], perm=[0, 2, 1, 3]),
                 helper.make_node("Reshape", ["context_t", "flat"], ["out"])]
    io = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, "P", HEADS * HEAD_DIM]) for name in "qkv"]
    out = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, "P", HEADS * HEAD_DIM])]
    model = helper.make_model(helper.make_graph(nodes, side, io, out, initializers), opset_imports=opsets)
    model.ir_version = 10
    return model.SerializeToString()


def worker(args) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(attention_graph(args.side), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {name: rng.standard_normal((1, args.patches, HEADS * HEAD_DIM), dtype=np.float32) for name in "qkv"}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ms = median_ms(lambda: session.run(None, feeds), args.runs)
    added_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(json.dumps({"ms": ms, "added_mb": added_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=5, help="timed calls per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=["time"], help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--patches", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    print(f"machine: {describe_machine()}, {args.threads} onnxruntime threads")
    for image, patches in PATCHES.items():
        results: dict[str, list[dict]] = {side: [] for side in SIDES}
        for _ in range(args.rounds):
            for side in SIDES:  # alternate the sides, a fresh process each
                results[side].append(run_worker(__file__, "time", side=side, patches=patches, runs=args.runs,
                                                threads=args.threads))
        times = {side: [r["ms"] for r in values] for side, values in results.items()}
        for side, values in results.items():
            print(f"{image} (P={patches}) {side:>18}: {spread(times[side], 1)} ms, "
                  f"+{spread([r['added_mb'] for r in values], 0)} MB")
        for side in SIDES[1:]:
            print(f"{image} primitive / {side} time: {spread(ratios(times['primitive'], times[side]))}")


if __name__ == "__main__":
    main()
