"""Where a CPU decode step goes: the levers measured for issue 25, each reproducible from here.

`kernels`: the 56 weight matmuls of one decode step of the LLaVA-shaped 1024 × 8 decoder (q, k, v,
o, gate, up, down per layer; MLP 2752, as `llamacpp.py`'s), alone in a graph of nothing else, at one
token: MatMulNBits INT4 and INT8 in blocks of 32, 64, 128 and 256 (accuracy level 4, int8
activations, as zspa-calibrate exports them) and DynamicQuantizeMatMul (INT8 per channel,
onnxruntime's other int8 kernel). What these take is the floor the kernels set under a step.

`spinning`: zspa-calibrate's INT4 decoder (blocks of 32) of the same model through the pipeline at
keep 0.1 and 1.0, with the backend's sessions as shipped (workers spin while a run lasts) and as
they were before (`session.intra_op.allow_spinning=0`: workers sleep between a run's parallel
sections, and a step is some 400 small nodes).

Every measurement is a fresh process (2 threads), the sides alternate over `--rounds`, figures
are median (min, max) over rounds, the machine named.

    python benchmarks/decode_step_levers.py [--levers kernels spinning] [--rounds 5]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llamacpp import INTERMEDIATE_SIZE, THREADS, worker_zspa, zspa_bundles  # noqa: E402

from isolation import alternate, median_ms, ratios, run_worker, spread  # noqa: E402
from llava_shaped import build_llava_shaped  # noqa: E402
from machine import describe_machine  # noqa: E402

HIDDEN, LAYERS = 1024, 8
BLOCK_SIZES = (32, 64, 128, 256)


def step_matmuls(kernel: str, bits: int = 4, block: int = 32):
    """An ONNX model of one decode step's weight matmuls at one token, random weights; the outputs of
    q, k, v are summed and gate × up multiplied so that every matmul feeds the next."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, weights = [], []

    def matmul(x: str, k: int, n: int, name: str) -> str:
        if kernel == "MatMulNBits":
            blocks, packed = -(-k // block), block * bits // 8
            weights.extend([numpy_helper.from_array(rng.integers(0, 255, (n, blocks, packed), dtype=np.uint8),
                                                    f"{name}.w"),
                            numpy_helper.from_array(rng.random(n * blocks, dtype=np.float32) * 0.01, f"{name}.s")])
            nodes.append(helper.make_node("MatMulNBits", [x, f"{name}.w", f"{name}.s"], [name], domain="com.microsoft",
                                          K=k, N=n, bits=bits, block_size=block, accuracy_level=4))
        else:
            weights.extend([numpy_helper.from_array(rng.integers(-64, 64, (k, n), dtype=np.int8), f"{name}.w"),
                            numpy_helper.from_array(rng.random(n, dtype=np.float32) * 0.01, f"{name}.s"),
                            numpy_helper.from_array(np.zeros(n, np.int8), f"{name}.z")])
            nodes.append(helper.make_node("DynamicQuantizeMatMul", [x, f"{name}.w", f"{name}.s", f"{name}.z"], [name],
                                          domain="com.microsoft"))
        return name

    x = "x"
    for layer in range(LAYERS):
        q, k, v = (matmul(x, HIDDEN, HIDDEN, f"{layer}.{part}") for part in "qkv")
        nodes.append(helper.make_node("Sum", [q, k, v], [f"{layer}.attention"]))
        out = matmul(f"{layer}.attention", HIDDEN, HIDDEN, f"{layer}.o")
        gate, up = matmul(out, HIDDEN, INTERMEDIATE_SIZE, f"{layer}.gate"), matmul(out, HIDDEN, INTERMEDIATE_SIZE,
                                                                                    f"{layer}.up")
        nodes.append(helper.make_node("Mul", [gate, up], [f"{layer}.mlp"]))
        x = matmul(f"{layer}.mlp", INTERMEDIATE_SIZE, HIDDEN, f"{layer}.down")
    graph = helper.make_graph(nodes, "step", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, HIDDEN])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, HIDDEN])], weights)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def worker_kernels(args) -> dict:
    import numpy as np

    from zspa.runtime.backends import OrtBackend

    model = step_matmuls(args.kernel, args.bits, args.block)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "step.onnx"
        path.write_bytes(model.SerializeToString())
        session = OrtBackend(threads=THREADS).session(path)  # the shipped session options
    x = np.random.default_rng(1).standard_normal((1, HIDDEN)).astype(np.float32)
    for _ in range(20):
        session.run(None, {"x": x})
    return {"step_ms": median_ms(lambda: session.run(None, {"x": x}), args.runs)}


def worker_pipeline(args) -> dict:
    """`llamacpp.py`'s zspa measurement; with `--sleeping`, the shipped backend's workers told to sleep."""
    from zspa.runtime import backends

    if args.sleeping:
        shipped = backends.OrtBackend.__init__

        def sleeping(self, *a, **k):
            shipped(self, *a, **k)
            self.options.add_session_config_entry("session.intra_op.allow_spinning", "0")

        backends.OrtBackend.__init__ = sleeping
    return worker_zspa(args)


def kernels(rounds: int, runs: int) -> None:
    sides = {f"MatMulNBits int{bits} block {block}": {"kernel": "MatMulNBits", "bits": bits, "block": block}
             for bits in (4, 8) for block in BLOCK_SIZES}
    sides["DynamicQuantizeMatMul int8 per channel"] = {"kernel": "DynamicQuantizeMatMul"}

    def measure(options: dict) -> float:
        return run_worker(__file__, "kernels", runs=runs, **options)["step_ms"]

    times = alternate({side: functools.partial(measure, options) for side, options in sides.items()}, rounds)
    print(f"\nkernels: a decode step's 56 weight matmuls alone ({HIDDEN} x {LAYERS}, MLP {INTERMEDIATE_SIZE}), "
          f"median ms a step over {runs} runs per process")
    for side, values in times.items():
        print(f"  {side}: {spread(values)} ms")


def spinning(rounds: int, tokens: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _, _, fp32 = build_llava_shaped(work, "n576", kv_cache="shared", intermediate_size=INTERMEDIATE_SIZE,
                                        text_hidden=HIDDEN, text_layers=LAYERS, keeps=[0.1])
        bundle = zspa_bundles(work / "n576-model", fp32, work, {"int4": ("int4", 32)})["int4"]
        sides = {f"{mode} keep {keep:g}": {"bundle": bundle, "keep": keep, "tokens": tokens,
                                           "sleeping": mode == "sleeping"}
                 for keep in (0.1, 1.0) for mode in ("spinning", "sleeping")}
        results = {side: [] for side in sides}

        def measure(side: str) -> float:
            results[side].append(run_worker(__file__, "pipeline", **sides[side]))
            return results[side][-1]["tokens_per_s"]

        rates = alternate({side: functools.partial(measure, side) for side in sides}, rounds)
    print(f"\nspinning: INT4 (blocks of 32) through the pipeline, {tokens} greedy tokens; decode tokens/s | TTFT ms")
    for side in sides:
        print(f"  {side}: {spread(rates[side], 1)} | {spread([r['ttft_ms'] for r in results[side]], 0)}")
    for keep in (0.1, 1.0):
        print(f"  decode spinning / sleeping at keep {keep:g}: "
              f"{spread(ratios(rates[f'spinning keep {keep:g}'], rates[f'sleeping keep {keep:g}']))}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levers", nargs="+", choices=["kernels", "spinning"], default=["kernels", "spinning"])
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds, a fresh process per side")
    parser.add_argument("--runs", type=int, default=200, help="timed steps per kernels measurement")
    parser.add_argument("--tokens", type=int, default=64, help="tokens decoded per spinning measurement")
    parser.add_argument("--worker", choices=["kernels", "pipeline"], help=argparse.SUPPRESS)
    parser.add_argument("--kernel", help=argparse.SUPPRESS)
    parser.add_argument("--bits", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--block", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--bundle", help=argparse.SUPPRESS)
    parser.add_argument("--keep", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--sleeping", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps({"kernels": worker_kernels, "pipeline": worker_pipeline}[args.worker](args)))
        return
    print(f"machine: {describe_machine()}")
    print(f"onnxruntime CPU, {THREADS} threads; {args.rounds} rounds, a process per measurement; median (min, max) "
          "over rounds")
    if "kernels" in args.levers:
        kernels(args.rounds, args.runs)
    if "spinning" in args.levers:
        spinning(args.rounds, args.tokens)


if __name__ == "__main__":
    main()
