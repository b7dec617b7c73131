"""`zspa-sign`: sign a bundle with an offline key or key and certificate (OpenSSF model-signing),
after checking its hashes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from zspa.cli.common import add_debug_flag, add_signing_flags, run_command, signing_key
from zspa.signing import SIGNATURE_NAME


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zspa-sign",
        description=f"Sign a zspa bundle: writes BUNDLE/{SIGNATURE_NAME}, covering every file but itself and "
        "engines/. Devices then run it with --verify-key PUB (a bare key) or --verify-certificate-chain ROOT "
        "(certificate mode).",
    )
    parser.add_argument("bundle", type=Path, help="bundle directory written by zspa-export or zspa-calibrate")
    add_signing_flags(parser, required=True)
    add_debug_flag(parser)
    return parser


def _sign(args: argparse.Namespace) -> None:
    from zspa.runtime.bundle import Bundle
    from zspa.signing import sign_bundle

    Bundle.open(args.bundle)  # sign only what verifies: schema, names, sha256 of every listed file
    print(f"signed: {sign_bundle(args.bundle, signing_key(args))}")


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), _sign, argv)


if __name__ == "__main__":
    sys.exit(main())
