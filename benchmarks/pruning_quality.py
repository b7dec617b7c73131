"""Pruning quality on the shapes benchmark: every method × keep, ZSPAPrune's α and pooling, and
both position schemes, measured with `zspa-eval`'s library on the trained `shapes-llava`.

    python benchmarks/pruning_quality.py [--examples 400] [--out benchmarks/results/pruning-quality]

Writes one Markdown report (`report.md`) and the accuracy plots beside it; the per-sweep
records and JSON stay in the work directory (`--work`, default a temporary one).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from zspa.datasets.shapes import write_jsonl
from zspa.export.exporter import ExportOptions, export_bundle
from zspa.pruning import METHOD_DEFAULTS, METHODS
from zspa.runtime.evaluation import Evaluation, markdown_table, plot_accuracy, read_dataset
from zspa.runtime.pipeline import Pipeline

KEEPS = [0.5, 0.25, 0.1, 0.05]
ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0]


def sweep(bundle: Path, items, out: Path, settings, positions: str | None = None) -> list[dict]:
    evaluation = Evaluation(Pipeline.load(bundle, positions=positions), out, settings, max_new_tokens=3)
    evaluation.run(items)
    return evaluation.summary()


def export(work: Path, name: str, **options) -> Path:
    path = work / name
    if not (path / "manifest.json").exists():
        export_bundle(ExportOptions("shapes-llava", path, keeps=KEEPS, progress=False, **options))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=400, help="test-split examples (default: 400)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pruning-quality"))
    parser.add_argument("--work", type=Path, default=None, help="keep bundles and records here (resumable)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="zspa-quality-"))
    args.out.mkdir(parents=True, exist_ok=True)
    items, _ = read_dataset(write_jsonl(work / "data", "test", args.examples))
    sections = []

    main_bundle = export(work, "all-methods", methods=list(METHODS))
    table = sweep(main_bundle, items, work / "eval-methods", [(m, k) for m in METHODS for k in KEEPS])
    plot_accuracy(table, args.out / "accuracy.png", "shapes-llava: accuracy vs keep")
    default_alpha = METHOD_DEFAULTS["zspa"]["relevance_ratio"]  # every run but the α sweep uses it
    sections.append((f"Methods × keep (α = {default_alpha:g}, mean pooling, original positions)", table))

    alpha_rows = []
    for alpha in ALPHAS:
        bundle = export(work, f"zspa-alpha-{alpha:g}", relevance_ratio=alpha)
        rows = sweep(bundle, items, work / f"eval-alpha-{alpha:g}", [("zspa", k) for k in KEEPS])
        alpha_rows += [{**r, "method": f"zspa α={alpha:g}"} for r in rows if r["method"] != "none"]
    sections.append(("ZSPAPrune relevance ratio α (mean pooling)", alpha_rows))

    max_bundle = export(work, "zspa-max-pooling", pooling="max")
    rows = sweep(max_bundle, items, work / "eval-max-pooling", [("zspa", k) for k in KEEPS])
    pooling_rows = [{**r, "method": "zspa max pooling"} for r in rows if r["method"] != "none"]
    pooling_rows += [{**r, "method": "zspa mean pooling"} for r in table if r["method"] == "zspa"]
    sections.append((f"ZSPAPrune question pooling (α = {default_alpha:g})", pooling_rows))

    contiguous = sweep(main_bundle, items, work / "eval-contiguous", [("zspa", k) for k in KEEPS], "contiguous")
    position_rows = [{**r, "method": "zspa contiguous"} for r in contiguous if r["method"] != "none"]
    position_rows += [{**r, "method": "zspa original"} for r in table if r["method"] == "zspa"]
    sections.append((f"Position ids of kept tokens (ZSPAPrune, α = {default_alpha:g})", position_rows))

    report = [f"# Pruning quality on shapes ({len(items)} test examples)\n"]
    report += [f"\n## {title}\n\n{markdown_table(rows)}" for title, rows in sections]
    (args.out / "report.md").write_text("".join(report))
    print("".join(report))
    print(f"wrote {args.out / 'report.md'} and {args.out / 'accuracy.png'} (work dir {work})")


if __name__ == "__main__":
    main()
