"""INT8 accuracy by quantization setting, on whatever x86 kernels this CPU (or an emulated one) picks.

onnxruntime multiplies u8 activations by s8 weights with VPMADDUBSW on x86 CPUs without VNNI,
which saturates pairs of products at 16 bits; with VNNI it does not. This script quantizes
tiny-random-llava's vision graph five ways on the same calibration feeds, and its decoder
weight-only in int4 and int8 (MatMulNBits, whose CPU kernel quantizes activations to int8 at
accuracy level 4), and prints each one's worst relative L2 error against fp32 over three feeds.
Run it natively, then under another CPU's kernels with qemu-user (Debian's `qemu-user`; minutes,
not seconds):

    python benchmarks/int8_kernels.py --workdir /tmp/int8
    qemu-x86_64 -cpu EPYC-Rome $(which python) benchmarks/int8_kernels.py --workdir /tmp/int8 --evaluate \
        --emulated-cpu EPYC-Rome
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from machine import describe_machine

# name → (activation type, weight type, reduce_range); symmetric where the type is signed
VARIANTS = {"s8s8": ("QInt8", "QInt8", False), "s8s8, reduce_range (zspa's)": ("QInt8", "QInt8", True),
            "u8s8": ("QUInt8", "QInt8", False), "u8s8, reduce_range": ("QUInt8", "QInt8", True),
            "u8u8": ("QUInt8", "QUInt8", False)}
DECODER_PRECISIONS = ("int4", "int8")  # zspa-calibrate --decoder


def prepare(workdir: Path) -> None:
    """Exports the tiny model, records its vision feeds on eight shapes images, writes every variant."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from zspa.calibration.quantize import _FeedReader, quantize_weights
    from zspa.calibration.recording import RecordingBackend
    from zspa.datasets.shapes import example, image_for
    from zspa.export.exporter import ExportOptions, export_bundle
    from zspa.runtime.bundle import Bundle
    from zspa.runtime.pipeline import Pipeline

    bundle = workdir / "tiny"
    if not bundle.exists():
        export_bundle(ExportOptions("tiny-random-llava", bundle, keeps=[0.1], progress=False))
    backend = RecordingBackend()
    pipeline = Pipeline(Bundle.open(bundle), backend)
    for i in range(8):
        pipeline.generate(image_for("test", 2000 + i), example("test", 2000 + i).question, max_new_tokens=1)
    for graph in ("vision", "decoder"):
        np.savez(workdir / f"{graph}-feeds.npz", **{f"{i}/{name}": value for i, feed in enumerate(
            backend.records[graph][:3]) for name, value in feed.items()})
    for precision in DECODER_PRECISIONS:
        quantize_weights(bundle / "decoder.onnx", workdir / f"decoder-{precision}.onnx", precision)
    feeds = backend.records["vision"]
    for index, (activations, weights, reduce_range) in enumerate(VARIANTS.values()):
        quantize_static(str(bundle / "vision.onnx"), str(workdir / f"variant-{index}.onnx"), _FeedReader(feeds),
                        quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                        per_channel=True, activation_type=QuantType[activations], weight_type=QuantType[weights],
                        calibrate_method=CalibrationMethod.MinMax, reduce_range=reduce_range,
                        extra_options={"ActivationSymmetric": activations == "QInt8",
                                       "WeightSymmetric": weights == "QInt8"})


def evaluate(workdir: Path, graph: str, variants: dict[str, Path]) -> dict[str, float]:
    """Each variant's worst relative L2 error against `graph`'s fp32 output on the stored feeds."""
    import onnxruntime as ort

    stored = np.load(workdir / f"{graph}-feeds.npz")
    feeds = [{} for _ in {key.split("/")[0] for key in stored.files}]
    for key in stored.files:
        index, name = key.split("/", 1)
        feeds[int(index)][name] = stored[key]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    reference = ort.InferenceSession(str(workdir / "tiny" / f"{graph}.onnx"), options)
    expected = [reference.run(None, f)[0] for f in feeds]
    errors = {}
    for name, path in variants.items():
        session = ort.InferenceSession(str(path), options)
        errors[name] = max(float(np.linalg.norm(session.run(None, f)[0] - e) / np.linalg.norm(e))
                           for f, e in zip(feeds, expected))
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True, help="where the bundle, feeds and variants go")
    parser.add_argument("--evaluate", action="store_true", help="only evaluate what an earlier run prepared")
    parser.add_argument("--emulated-cpu", default=None, metavar="NAME",
                        help="the CPU qemu-user emulates (its /proc/cpuinfo still shows the host's), e.g. EPYC-Rome")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if not args.evaluate:
        prepare(args.workdir)
    emulated = f"qemu-user -cpu {args.emulated_cpu} (onnxruntime picks that CPU's kernels)"
    print(describe_machine() if args.emulated_cpu is None else emulated)
    graphs = {"vision graph, static Q/DQ": ("vision", {name: args.workdir / f"variant-{index}.onnx"
                                                      for index, name in enumerate(VARIANTS)}),
              "decoder prefill, weight-only MatMulNBits": ("decoder", {
                  precision: args.workdir / f"decoder-{precision}.onnx" for precision in DECODER_PRECISIONS})}
    for title, (graph, variants) in graphs.items():
        print(f"{title}, worst relative L2 error against fp32 over 3 feeds:")
        for name, error in evaluate(args.workdir, graph, variants).items():
            print(f"  {name:<28} {error:.3f}")


if __name__ == "__main__":
    main()
