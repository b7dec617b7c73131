"""What every zspa command shares: argument types, `--debug`, and errors → one line + exit code."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from zspa.errors import ZspaError


def ratio_list(text: str) -> list[float]:
    """`0.1,0.25` → [0.1, 0.25]; range checks happen in the library, which names the bad value."""
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def method_list(text: str) -> list[str]:
    from zspa.pruning import METHODS

    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        given = ", ".join(unknown) or repr(text)
        raise argparse.ArgumentTypeError(f"unknown method(s) {given}; choose from {', '.join(METHODS)}")
    return names


def add_backend_flags(parser) -> None:
    """--backend and --threads, for every command that runs a bundle (a parser or an argument group)."""
    from zspa.runtime.backends import BACKENDS

    parser.add_argument("--backend", choices=BACKENDS, default="ort-cpu",
                        help="onnxruntime on CPU, CUDA or TensorRT (engines cached in BUNDLE/engines/ort-trt), or "
                             "trt: the engines zspa-build wrote, run by TensorRT itself")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--max-context", type=int, default=None,
                        help="positions a request may use (prompt, image tokens, answer); also sizes the KV cache "
                             "that shared-KV and TensorRT decoders preallocate (default: the model's context)")
    add_verify_flag(parser)


def add_verify_flag(parser) -> None:
    parser.add_argument("--verify-key", type=Path, default=None, metavar="PUB",
                        help="refuse the bundle unless this public key (PEM) signed it as it is (zspa-sign)")


def backend_options(args: argparse.Namespace) -> dict:
    """`Pipeline.load` keywords from the flags `add_backend_flags` defined."""
    return {"backend": args.backend, "threads": args.threads, "max_context": args.max_context,
            "verify_key": args.verify_key}


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def run_command(parser: argparse.ArgumentParser, command: Callable[[argparse.Namespace], None],
                argv: list[str] | None = None) -> int:
    """Parses `argv`, runs `command`, and turns expected failures into `prog: error: message`."""
    args = parser.parse_args(argv)
    try:
        command(args)
    except ZspaError as exc:
        if args.debug:
            raise
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(f"{parser.prog}: unexpected error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
    return 0
