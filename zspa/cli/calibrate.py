"""`zspa-calibrate`: quantized graphs, calibrated on your images and prompts, in a new bundle."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from zspa.cli.common import add_debug_flag, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zspa-calibrate", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Write a new bundle with an INT8 (static Q/DQ) vision graph and an INT4 (or INT8) weight-only "
                    "decoder, calibrated by running the bundle on real images and prompts at its keep ratio.",
    )
    parser.add_argument("bundle", type=Path, help="source bundle (fp32 or fp16, from zspa-export)")
    parser.add_argument("--images", type=Path, required=True, help="directory of calibration images")
    parser.add_argument("--prompts", type=Path, required=True,
                        help="prompts, one per line (or .jsonl with a \"prompt\" field), paired with the images "
                             "in turn")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the new bundle's directory")
    parser.add_argument("--vision", choices=["int8", "fp32"], default="int8", help="vision graph precision")
    parser.add_argument("--decoder", choices=["int4", "int8", "fp32"], default="int4",
                        help="decoder weight precision (weight-only, MatMulNBits): int4 is the smallest and fastest, "
                             "int8 the closest to fp32")
    parser.add_argument("--tensorrt", choices=["int8", "fp8"], default=None,
                        help="also write NVIDIA ModelOpt Q/DQ graphs for TensorRT (needs nvidia-modelopt)")
    parser.add_argument("--keep", type=float, default=None, help="keep ratio to calibrate at (default: the smallest)")
    parser.add_argument("--method", default=None, help="pruning method (default: the bundle's first)")
    parser.add_argument("--max-samples", type=int, default=64)
    parser.add_argument("--min-samples", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=32, help="weight-only quantization block")
    parser.add_argument("--fidelity-tokens", type=int, default=16, help="tokens per prompt in the fidelity check")
    parser.add_argument("--force", action="store_true", help="replace an existing output bundle")
    add_debug_flag(parser)
    return parser


def _calibrate(args: argparse.Namespace) -> None:
    from zspa.calibration.calibrate import CalibrateOptions, calibrate_bundle

    manifest = calibrate_bundle(CalibrateOptions(
        args.bundle, args.images, args.prompts, args.output, vision=args.vision, decoder=args.decoder,
        tensorrt=args.tensorrt, keep=args.keep, method=args.method, max_samples=args.max_samples,
        min_samples=args.min_samples, block_size=args.block_size, fidelity_tokens=args.fidelity_tokens,
        force=args.force,
    ))
    report = manifest.calibration
    fidelity, size = report["fidelity"], report["graph_bytes"]
    print(f"{args.output}: calibrated on {report['samples']} samples at keep {report['keep']:g}")
    for name, spec in manifest.graphs.items():
        if spec.quantization:
            print(f"  {name}: {spec.quantization['precision']} ({spec.quantization['method']})")
    print(f"  graphs on disk: {size['source'] / 1e6:.1f} MB → {size['calibrated'] / 1e6:.1f} MB")
    print(f"  against the source, {fidelity['prompts']} prompts × {fidelity['max_new_tokens']} tokens: greedy "
          f"agreement {fidelity['greedy_agreement']:.1%}, first token {fidelity['first_token_agreement']:.1%}, "
          f"mean first-token KL {fidelity['mean_first_token_kl']:.4f}")


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), _calibrate, argv)


if __name__ == "__main__":
    sys.exit(main())
