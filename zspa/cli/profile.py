"""`zspa-profile`: per-stage latency, throughput and memory across a bundle's pruning settings."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from zspa.cli.common import (
    add_backend_flags,
    add_debug_flag,
    backend_options,
    charts,
    method_list,
    ratio_list,
    run_command,
)

DEFAULT_IMAGE = Path(__file__).resolve().parent.parent / "assets" / "example.png"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zspa-profile",
        description="Profile a bundle: per-stage latency percentiles, time to first token, decode tokens/s, "
        "KV-cache size and memory for each pruning setting; JSON + Markdown + plots (and Jetson power/clocks).",
    )
    parser.add_argument("bundle", help="bundle directory written by zspa-export")
    parser.add_argument("--image", default=str(DEFAULT_IMAGE), help="default: the bundled example image")
    parser.add_argument("--prompt", default="Describe the image.", help="default: 'Describe the image.'")
    parser.add_argument("--keeps", type=ratio_list, default=None,
                        help="keep ratios, any in (0, 1] (default: the bundle's exported keeps, plus 1.0)")
    parser.add_argument("--methods", type=method_list, default=None, help="default: every method in the bundle")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per setting (default: 2)")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per setting (default: 10)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens per run, EOS ignored (default: 32)")
    parser.add_argument("--out", type=Path, default=Path("profile"), help="output directory (default: profile/)")
    add_backend_flags(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_debug_flag(parser)
    return parser


def _settings(bundle, methods, keeps) -> list[tuple[str | None, float]]:
    methods = methods or bundle.methods
    for method in methods:
        bundle.require_method(method)
    settings: list[tuple[str | None, float]] = []
    if keeps is None or 1.0 in keeps:
        settings.append((None, 1.0))
    for method in methods:
        for keep in keeps or bundle.keeps(method):
            bundle.pruner_for(keep, method)  # refuses a keep the bundle cannot run, before any work
            if keep < 1.0:
                settings.append((method, keep))
    return settings


def _profile(args: argparse.Namespace) -> None:
    from zspa.errors import InvalidInputError
    from zspa.runtime.images import load_image
    from zspa.runtime.pipeline import Pipeline
    from zspa.runtime.profiling import ProfileConfig, markdown_report, run_profile, write_report

    if args.warmup < 0 or args.runs < 1 or args.max_new_tokens < 1:
        raise InvalidInputError("--warmup must be ≥ 0, --runs and --max-new-tokens ≥ 1")
    load_image(args.image)  # a bad image fails now, not after loading every graph
    pipeline = Pipeline.load(args.bundle, **backend_options(args))
    config = ProfileConfig(args.image, args.prompt, _settings(pipeline.bundle, args.methods, args.keeps),
                           args.warmup, args.runs, args.max_new_tokens)
    report = run_profile(pipeline, config, progress=not args.quiet)
    paths = write_report(report, args.out) + charts(lambda plots: plots.plot_profile(report, args.out), "zspa-profile")
    print(markdown_report(report), end="")
    print("wrote " + ", ".join(str(p) for p in paths))


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), _profile, argv)


if __name__ == "__main__":
    sys.exit(main())
