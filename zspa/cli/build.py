"""`zspa-build`: TensorRT engines for this GPU, from a bundle's ONNX graphs. Run it on the target device."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from zspa.cli.common import add_debug_flag, add_verify_flag, run_command, trust_policy


def build_parser() -> argparse.ArgumentParser:
    from zspa.runtime.engines import PRECISIONS

    parser = argparse.ArgumentParser(
        prog="zspa-build", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Build TensorRT engines for this GPU into BUNDLE/engines/<gpu>-sm<cc>-trt<version>/.",
    )
    parser.add_argument("bundle", type=Path, help="bundle directory written by zspa-export (or zspa-calibrate)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp16",
                        help="int8 / fp8 / int4 use the Q/DQ graphs of zspa-calibrate --tensorrt; pruners stay fp32")
    parser.add_argument("--max-context", type=int, default=None,
                        help="largest prompt plus answer the engines accept (default: the model's context)")
    parser.add_argument("--workspace", type=float, default=4.0, help="TensorRT workspace, GiB")
    parser.add_argument("--force", action="store_true", help="rebuild engines that exist")
    add_verify_flag(parser)
    add_debug_flag(parser)
    return parser


def _build(args: argparse.Namespace) -> None:
    from zspa.runtime.trt_build import BuildOptions, build_engines

    target = build_engines(BuildOptions(args.bundle, args.precision, args.max_context, args.workspace, args.force,
                                        trust=trust_policy(args)))
    print(f"engines written to {target}")


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), _build, argv)


if __name__ == "__main__":
    sys.exit(main())
