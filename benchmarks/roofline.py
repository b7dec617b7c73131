"""The decoder's prefill and decode against this CPU's limits (the roofline).

- Prefill at keep 1.0 (594 tokens): GFLOP/s achieved by the exported decoder graph, against the
  peak from cores x clock x FP32 lanes x 2 (multiply-add) x FMA units (target >= 70 %), and
  against what onnxruntime's own GEMM reaches on one large product (the practical ceiling).
  FLOPs: 2 x tokens x every layer weight matrix's size, 2 x the LM head's (the graph computes
  the last position's logits only), plus causal attention, 2 x 2 x hidden x S(S+1)/2 per layer.
- Decode at the pruned (76) and unpruned (594) context: bytes read per token (every weight, plus
  the keys and values attended to) per second, against the memory bandwidth onnxruntime reads a
  1 GiB tensor with (target >= 70 %).
- Where each misses, the profile says why: onnxruntime's per-operator time shares.

The model is performance.py's (LLaVA-1.5 geometry, 1024-wide 8-layer decoder, random weights,
fp32), for both decoder KV caches. Every measurement runs in a fresh process; medians with the
spread over `--rounds`.

    python benchmarks/roofline.py [--rounds 3] [--fma-units 2]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from isolation import median_ms, run_worker, spread  # noqa: E402
from llava_shaped import build_llava_shaped  # noqa: E402
from machine import describe_machine  # noqa: E402

PREFILL_TOKENS, DECODE_CONTEXTS, DECODE_STEPS = 594, (76, 594), 32
_LANES = (("avx512f", 16), ("avx2", 8), ("asimd", 4), ("neon", 4))


def machine_peak_gflops(fma_units: int) -> tuple[float, str]:
    """cores x clock x lanes x 2 x FMA units, and the formula with its numbers."""
    flags, mhz = set(), 0.0
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags = set(value.split())
        elif key.strip() == "cpu MHz":
            mhz = max(mhz, float(value))
    lanes = next((n for flag, n in _LANES if flag in flags), 1)
    cores = len(os.sched_getaffinity(0))
    peak = cores * mhz / 1000 * lanes * 2 * fma_units
    return peak, f"{cores} cores x {mhz / 1000:.2f} GHz x {lanes} FP32 lanes x 2 (FMA) x {fma_units} FMA units"


def _options(profile_dir: str | None = None):
    """The runtime's own session options (threads, no spinning, denormals flushed)."""
    from zspa.runtime.backends import OrtBackend

    backend = OrtBackend()
    if profile_dir:
        backend.options.enable_profiling = True
        backend.options.profile_file_prefix = os.path.join(profile_dir, "profile")
    return backend


def _session(model):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), _options().options, providers=["CPUExecutionProvider"])


def worker_gemm(args) -> dict:
    """onnxruntime's MatMul on one large product with constant (prepacked) weights."""
    from onnx import TensorProto, helper, numpy_helper

    m, k, n = 2048, 4096, 4096
    weights = numpy_helper.from_array(np.random.default_rng(0).standard_normal((k, n), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], [weights])
    session = _session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    x = np.random.default_rng(1).standard_normal((m, k), np.float32)
    return {"gflops": 2 * m * k * n / median_ms(lambda: session.run(None, {"x": x}), args.runs) / 1e6}


def worker_bandwidth(args) -> dict:
    """The best rate a matrix-vector product streams a 1 GiB matrix at (numpy's BLAS and onnxruntime's
    MatMul, all threads): the read pattern of decode, where every weight is read once per token."""
    from onnx import TensorProto, helper

    rows = cols = 1 << 14
    graph = helper.make_graph([helper.make_node("MatMul", ["v", "m"], ["y"])], "gemv",
                              [helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, rows]),
                               helper.make_tensor_value_info("m", TensorProto.FLOAT, [rows, cols])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cols])])
    session = _session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    matrix, vector = np.ones((rows, cols), np.float32), np.ones((1, rows), np.float32)
    fastest_ms = min(median_ms(lambda: session.run(None, {"v": vector, "m": matrix}), args.runs),
                     median_ms(lambda: vector @ matrix, args.runs))
    return {"gb_per_s": matrix.nbytes / fastest_ms / 1e6}


def _profile_shares(profile_file: str) -> list[dict[str, float]]:
    """Per run of the session, the five operators with the most kernel time, in % of the run's."""
    events = json.loads(Path(profile_file).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e["name"] == "model_run")
    totals = [collections.Counter() for _ in runs]
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            index = next(i for i, (start, end) in enumerate(runs) if start <= event["ts"] <= end)
            totals[index][event["args"]["op_name"]] += event["dur"]
    return [{op: round(100 * us / sum(total.values()), 1) for op, us in total.most_common(5)} for total in totals]


def worker_decoder(args) -> dict:
    """Prefill of PREFILL_TOKENS tokens and decode steps after each context, through the runtime's
    decoder session; then a profiled prefill and decode step for the per-operator shares."""
    from zspa.runtime.bundle import Bundle

    bundle = Bundle.open(args.bundle)
    manifest = bundle.manifest
    hidden = next(t.shape[-1] for t in manifest.graphs["decoder"].inputs if t.name == "inputs_embeds")
    rng = np.random.default_rng(0)

    class Sequence:
        """A decoder session and the number of positions it holds."""

        def __init__(self, backend):
            self.decoder = backend.decoder(bundle.graph_file("decoder"), manifest.decoder, manifest.text.max_context)
            self.length = 0

        def restart(self, tokens: int) -> None:
            self.decoder.reset()
            self.length = 0
            self.extend(tokens)

        def extend(self, tokens: int) -> None:
            embeds = (rng.standard_normal((1, tokens, hidden)) * 0.02).astype(np.float32)
            positions = np.arange(self.length, self.length + tokens, dtype=np.int64)[None]
            self.decoder.step(embeds, np.ones((1, self.length + tokens), np.int64), positions)
            self.length += tokens

    sequence = Sequence(_options())
    result = {"prefill_ms": median_ms(lambda: sequence.restart(PREFILL_TOKENS), args.runs)}
    for context in DECODE_CONTEXTS:
        sequence.restart(context)
        sequence.extend(1)
        start = time.perf_counter()
        for _ in range(DECODE_STEPS):
            sequence.extend(1)
        result[f"step_ms_{context}"] = (time.perf_counter() - start) * 1000 / DECODE_STEPS
    with tempfile.TemporaryDirectory() as profiles:
        profiled = Sequence(_options(profiles))
        profiled.restart(PREFILL_TOKENS)
        for _ in range(4):
            profiled.extend(1)
        shares = _profile_shares(profiled.decoder.session.end_profiling())
    result["prefill_ops"], result["decode_ops"] = shares[0], shares[-1]
    return result


def decoder_costs(bundle: Path) -> dict[str, float]:
    """Weight-matrix elements of the layers and of the LM head (the product that yields `logits`),
    weight bytes, layers and hidden size of the decoder graph."""
    import onnx

    from zspa.runtime.bundle import Bundle

    opened = Bundle.open(bundle)
    model = onnx.load(str(opened.graph_file("decoder")))
    initializers = {t.name: t for t in model.graph.initializer}
    products = {n.output[0]: int(np.prod(initializers[n.input[1]].dims)) for n in model.graph.node
                if n.op_type in ("MatMul", "Gemm") and n.input[1] in initializers}
    head = products.pop("logits")
    weight_bytes = sum(int(np.prod(t.dims)) * 4 for t in model.graph.initializer
                       if t.data_type == onnx.TensorProto.FLOAT)
    spec = opened.manifest.decoder
    hidden = next(t.shape[-1] for t in opened.manifest.graphs["decoder"].inputs if t.name == "inputs_embeds")
    return {"matrix": sum(products.values()), "head": head, "weight_bytes": weight_bytes, "layers": spec.num_layers,
            "hidden": hidden, "kv_per_token": 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 4}


WORKERS = {"gemm": worker_gemm, "bandwidth": worker_bandwidth, "decoder": worker_decoder}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds, a fresh process per measurement")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per process (median)")
    parser.add_argument("--fma-units", type=int, default=2,
                        help="FMA units per core (2 on server Xeons and EPYC Zen 4)")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--bundle", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return

    from zspa.export.exporter import ExportOptions, export_bundle

    peak, formula = machine_peak_gflops(args.fma_units)
    print(f"machine: {describe_machine()}\npeak FP32: {formula} = {peak:.0f} GFLOP/s")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _, _, concat = build_llava_shaped(work, "n576", text_hidden=1024, text_layers=8, keeps=[0.1])
        shared = work / "n576-shared"
        export_bundle(ExportOptions(str(work / "n576-model"), shared, keeps=[0.1], kv_cache="shared", progress=False))
        costs = decoder_costs(concat)
        bundles = {"concat": concat, "shared": shared}
        gemm, bandwidth, decoder = [], [], {name: [] for name in bundles}
        for _ in range(args.rounds):
            gemm.append(run_worker(__file__, "gemm", runs=args.runs)["gflops"])
            bandwidth.append(run_worker(__file__, "bandwidth", runs=args.runs)["gb_per_s"])
            for name, bundle in bundles.items():
                decoder[name].append(run_worker(__file__, "decoder", bundle=bundle, runs=args.runs))
        print(f"onnxruntime MatMul 2048x4096x4096: {spread(gemm, 0)} GFLOP/s = "
              f"{spread([100 * g / peak for g in gemm], 0)} % of peak; memory read bandwidth (matrix-vector "
              f"product over 1 GiB): {spread(bandwidth, 1)} GB/s")
        attention = costs["layers"] * 2 * costs["hidden"] * PREFILL_TOKENS * (PREFILL_TOKENS + 1)
        flops = 2 * PREFILL_TOKENS * costs["matrix"] + 2 * costs["head"] + attention
        print(f"decoder: {costs['matrix'] / 1e6:.1f} M layer weight-matrix elements, "
              f"{costs['weight_bytes'] / 1e6:.0f} MB of weights; prefill of {PREFILL_TOKENS} tokens = "
              f"{flops / 1e9:.1f} GFLOP")
        for name, runs in decoder.items():
            achieved = [flops / r["prefill_ms"] / 1e6 for r in runs]
            print(f"{name} KV cache, prefill: {spread([r['prefill_ms'] for r in runs], 0)} ms = {spread(achieved, 0)}"
                  f" GFLOP/s = {spread([100 * a / peak for a in achieved], 0)} % of peak (target >= 70 %), "
                  f"{spread([100 * a / g for a, g in zip(achieved, gemm)], 0)} % of onnxruntime's GEMM; "
                  f"operator shares {runs[0]['prefill_ops']}")
            for context in DECODE_CONTEXTS:
                read = costs["weight_bytes"] + costs["kv_per_token"] * (context + 1 + DECODE_STEPS / 2)
                rate = [read / r[f"step_ms_{context}"] / 1e6 for r in runs]
                print(f"{name} KV cache, decode at context {context}: {spread([r[f'step_ms_{context}'] for r in runs])}"
                      f" ms/token, {read / 1e6:.0f} MB read per token = {spread(rate, 1)} GB/s = "
                      f"{spread([100 * r / b for r, b in zip(rate, bandwidth)], 0)} % of measured bandwidth "
                      f"(target >= 70 %)")
            print(f"{name} KV cache, decode operator shares at context {PREFILL_TOKENS}: {runs[0]['decode_ops']}")


if __name__ == "__main__":
    main()
