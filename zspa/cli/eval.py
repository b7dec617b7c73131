"""`zspa-eval`: accuracy and agreement with the unpruned model across methods and keeps."""

from __future__ import annotations

import argparse
import json
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
from zspa.errors import InvalidInputError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zspa-eval",
        description="Score a bundle's pruners on a JSONL data set (image, question, answer, optional choices): "
        "accuracy, and agreement with the same bundle unpruned. Resumable: rerun to continue.",
    )
    parser.add_argument("bundle", help="bundle directory written by zspa-export")
    parser.add_argument("--data", type=Path, required=True, help="JSONL file, image paths relative to it")
    parser.add_argument("--out", type=Path, required=True, help="output directory (records, results.json/md, plot)")
    parser.add_argument("--methods", type=method_list, default=None, help="default: every method in the bundle")
    parser.add_argument("--keeps", type=ratio_list, default=None,
                        help="keep ratios, any in (0, 1] (default: the keeps the bundle was exported with)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="default: 16")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N lines")
    parser.add_argument("--positions", choices=["contiguous", "original"], default=None)
    add_backend_flags(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_debug_flag(parser)
    return parser


def _settings(bundle, methods, keeps) -> list[tuple[str, float]]:

    methods = methods or bundle.methods
    if not methods:
        raise InvalidInputError("the bundle has no pruners; export it with --keep below 1")
    settings = []
    for method in methods:
        bundle.require_method(method)
        for keep in keeps or bundle.keeps(method)[:-1]:
            bundle.pruner_for(keep, method)  # refuses what the bundle cannot run, before any work
            if keep < 1.0:
                settings.append((method, keep))
    return settings


def _eval(args: argparse.Namespace) -> None:
    from zspa.evaluation import Evaluation, kind_table, markdown_table, read_dataset
    from zspa.runtime.pipeline import Pipeline

    items, problems = read_dataset(args.data)
    for problem in problems:
        print(f"zspa-eval: skipping {problem}", file=sys.stderr)
    if not items:  # an empty table and exit 0 would read as a finished evaluation
        raise InvalidInputError(f"{args.data}: no usable question ({len(problems)} line(s) skipped); each line is a "
                                'JSON object with "question", "answer" and "image" or "images"')
    pipeline = Pipeline.load(args.bundle, **backend_options(args), positions=args.positions)
    settings = _settings(pipeline.bundle, args.methods, args.keeps)
    items = items[: args.limit] if args.limit else items
    evaluation = Evaluation(pipeline, args.out, settings, args.max_new_tokens)
    for problem in evaluation.run(items, progress=not args.quiet):
        print(f"zspa-eval: skipping {problem}", file=sys.stderr)
    table = evaluation.summary()
    if not table:
        raise InvalidInputError("no question could be answered (each failed, above); no results written")
    report = {"bundle": str(Path(args.bundle).resolve()), "data": str(args.data.resolve()),
              "positions": pipeline.positions, "skipped_lines": problems, "results": table}
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = markdown_table(table)
    if by_kind := kind_table(table):
        markdown += "\nAccuracy per question kind:\n\n" + by_kind
    (args.out / "results.md").write_text(markdown)
    title = f"{pipeline.bundle.manifest.source.model_id}: accuracy vs keep"
    written = charts(lambda plots: [plots.plot_accuracy(table, args.out / "accuracy.png", title)], "zspa-eval")
    print(markdown, end="")
    print(f"wrote {args.out / 'results.json'}, results.md" + "".join(f", {path.name}" for path in written))


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), _eval, argv)


if __name__ == "__main__":
    sys.exit(main())
