"""What every zspa command shares: argument types, `--debug`, and errors → one line + exit code."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

from zspa.errors import InvalidInputError, ZspaError
from zspa.signing import PASSWORD_ENV, SigningKey, TrustPolicy


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
    """--verify-key or --verify-certificate-chain: who a device accepts bundles from (zspa-sign)."""
    trusted = parser.add_mutually_exclusive_group()
    trusted.add_argument("--verify-key", type=Path, default=None, metavar="PUB",
                         help="refuse the bundle unless this public key (PEM) signed it as it is")
    trusted.add_argument("--verify-certificate-chain", type=Path, action="append", default=None, metavar="PEM",
                         help="refuse the bundle unless it was signed as it is with a code-signing certificate that "
                              "chains to these root certificates (PEM; repeatable)")


def trust_policy(args: argparse.Namespace) -> TrustPolicy | None:
    """The `TrustPolicy` the flags of `add_verify_flag` name; None when neither is given."""
    if args.verify_key is None and not args.verify_certificate_chain:
        return None
    return TrustPolicy(public_key=args.verify_key, certificate_roots=tuple(args.verify_certificate_chain or ()))


def add_signing_flags(parser: argparse._ActionsContainer, prefix: str = "", *, required: bool = False) -> None:
    """The signer's key and, for certificate mode, its certificate and chain (zspa-sign, zspa-export)."""
    parser.add_argument(f"--{prefix}key", type=Path, default=None, required=required, metavar="KEY",
                        help=f"elliptic-curve private key, PEM (password, if any, in ${PASSWORD_ENV})")
    parser.add_argument(f"--{prefix}certificate", type=Path, default=None, metavar="CERT",
                        help="certificate mode: the key's code-signing certificate (PEM); devices then trust its "
                             "root with --verify-certificate-chain instead of one public key")
    parser.add_argument(f"--{prefix}certificate-chain", type=Path, action="append", default=None, metavar="PEM",
                        help="certificate mode: intermediate and root certificates (PEM; repeatable)")


def signing_key(args: argparse.Namespace, prefix: str = "") -> SigningKey | None:
    """The `SigningKey` the flags of `add_signing_flags(prefix=...)` name; None without a key."""
    dest = prefix.replace("-", "_")
    key, certificate = getattr(args, f"{dest}key"), getattr(args, f"{dest}certificate")
    chain = tuple(getattr(args, f"{dest}certificate_chain") or ())
    if key is None:
        if certificate is not None or chain:
            raise InvalidInputError(f"--{prefix}certificate needs --{prefix}key, the certificate's private key")
        return None
    return SigningKey(key, certificate, chain)


def backend_options(args: argparse.Namespace) -> dict:
    """`Pipeline.load` keywords from the flags `add_backend_flags` defined."""
    return {"backend": args.backend, "threads": args.threads, "max_context": args.max_context,
            "trust": trust_policy(args)}


def charts(draw: Callable, prog: str) -> list[Path]:
    """`draw(zspa.plots)`'s files where matplotlib is installed; otherwise none, said on stderr (a
    device's runtime install has no matplotlib, and the numbers are written either way)."""
    if importlib.util.find_spec("matplotlib") is None:
        print(f"{prog}: matplotlib is not installed, so no charts (pip install 'zspa[plots]')", file=sys.stderr)
        return []
    from zspa import plots

    return draw(plots)


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
