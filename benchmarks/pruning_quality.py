"""Pruning quality on a synthetic benchmark: every method × keep, ZSPAPrune's α and pooling, and
both position schemes, measured with `zspa-eval`'s library on the benchmark's trained model, with
95 % bootstrap intervals over questions (margins between methods paired on the same questions).

    python benchmarks/pruning_quality.py [--dataset needles] [--examples 1000] [--work DIR]

Writes `report.md`, `results.json` and `accuracy.png` under `--out` (default
benchmarks/results/pruning-quality/DATASET); bundles and per-answer records stay in the work
directory (`--work`, default a temporary one; pass one to resume an interrupted run).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from zspa.datasets import needles, shapes
from zspa.evaluation import Evaluation, kind_table, markdown_table, read_dataset
from zspa.export.exporter import ExportOptions, export_bundle
from zspa.plots import plot_accuracy
from zspa.pruning import METHOD_DEFAULTS, METHODS
from zspa.runtime.pipeline import Pipeline

DATASETS = {"needles": (needles, "needles-llava"), "shapes": (shapes, "shapes-llava")}
KEEPS = [0.5, 0.25, 0.1, 0.05]
ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0]
HEADLINE_KEEP = 0.1
ZSPA_SWEEP = [("zspa", k) for k in KEEPS]
RIVALS = ("divprune", "cdpruner", "random")


def evaluate(bundle: Path, items, out: Path, settings, positions: str | None = None) -> Evaluation:
    evaluation = Evaluation(Pipeline.load(bundle, positions=positions), out, settings, max_new_tokens=3)
    evaluation.run(items)
    return evaluation


def export(model: str, work: Path, name: str, **options) -> Path:
    path = work / name
    if not (path / "manifest.json").exists():
        export_bundle(ExportOptions(model, path, keeps=KEEPS, progress=False, **options))
    return path


def relabelled(rows: list[dict], label: str) -> list[dict]:
    return [{**r, "method": label} for r in rows if r["method"] != "none"]


def headline(evaluation: Evaluation, table: list[dict]) -> dict:
    """ZSPAPrune at keep 0.1: retained accuracy, margins over the rivals, rank among methods."""
    at_keep = sorted((r for r in table if r["keep"] == HEADLINE_KEEP), key=lambda r: -r["accuracy"])
    zspa = next(r for r in at_keep if r["method"] == "zspa")
    return {
        "keep": HEADLINE_KEEP,
        "retained_accuracy": zspa["retained_accuracy"],
        "retained_interval": zspa["retained_interval"],
        "rank": 1 + sum(r["accuracy"] > zspa["accuracy"] for r in at_keep),
        "of": len(at_keep),
        "margins": {rival: evaluation.margin(("zspa", HEADLINE_KEEP), (rival, HEADLINE_KEEP)) for rival in RIVALS},
    }


def headline_text(result: dict) -> str:
    low, high = result["retained_interval"]
    lines = [f"ZSPAPrune at keep {result['keep']:g}: retained accuracy {result['retained_accuracy']:.3f} "
             f"(95 % CI {low:.3f}–{high:.3f}); rank {result['rank']} of {result['of']} methods by accuracy."]
    for rival, margin in result["margins"].items():
        low, high = margin["interval"]
        lines.append(f"- margin over {rival}: {margin['margin']:+.3f} accuracy (95 % CI {low:+.3f} to {high:+.3f}, "
                     f"paired over {margin['n']} questions)")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="needles")
    parser.add_argument("--examples", type=int, default=1000, help="test-split questions (default: 1000)")
    parser.add_argument("--ablation-examples", type=int, default=None,
                        help="questions for the α, pooling and position ablations (default: --examples)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/pruning-quality/DATASET")
    parser.add_argument("--work", type=Path, default=None, help="keep bundles and records here (resumable)")
    args = parser.parse_args()
    dataset, model = DATASETS[args.dataset]
    out = args.out or Path(__file__).resolve().parent / "results" / "pruning-quality" / args.dataset
    work = args.work or Path(tempfile.mkdtemp(prefix="zspa-quality-"))
    out.mkdir(parents=True, exist_ok=True)
    items, _ = read_dataset(dataset.write_jsonl(work / "data", "test", args.examples))
    ablation_items = items[: args.ablation_examples or len(items)]
    default_alpha = METHOD_DEFAULTS["zspa"]["relevance_ratio"]  # every run but the α sweep uses it
    sections = []

    main_bundle = export(model, work, "all-methods", methods=list(METHODS))
    methods = evaluate(main_bundle, items, work / "eval-methods", [(m, k) for m in METHODS for k in KEEPS])
    table = methods.summary()
    plot_accuracy(table, out / "accuracy.png", f"{model} on {args.dataset}: accuracy vs keep (95 % CI)")
    result = headline(methods, table)
    title = f"Methods × keep (α = {default_alpha:g}, mean pooling, original positions)"
    sections.append((title, markdown_table(table)))
    sections.append(("Accuracy per question kind", kind_table(table)))

    alpha_rows = []
    for alpha in ALPHAS:
        bundle = export(model, work, f"zspa-alpha-{alpha:g}", relevance_ratio=alpha)
        rows = evaluate(bundle, ablation_items, work / f"eval-alpha-{alpha:g}", ZSPA_SWEEP).summary()
        alpha_rows += relabelled(rows, f"zspa α={alpha:g}")
    sections.append(("ZSPAPrune relevance ratio α (mean pooling)", markdown_table(alpha_rows)))

    max_bundle = export(model, work, "zspa-max-pooling", pooling="max")
    rows = evaluate(max_bundle, ablation_items, work / "eval-max-pooling", ZSPA_SWEEP).summary()
    mean_rows = evaluate(main_bundle, ablation_items, work / "eval-mean-pooling", ZSPA_SWEEP).summary()
    pooling_rows = relabelled(rows, "zspa max pooling") + relabelled(mean_rows, "zspa mean pooling")
    sections.append((f"ZSPAPrune question pooling (α = {default_alpha:g})", markdown_table(pooling_rows)))

    contiguous = evaluate(main_bundle, ablation_items, work / "eval-contiguous", ZSPA_SWEEP,
                          "contiguous").summary()
    position_rows = relabelled(contiguous, "zspa contiguous") + relabelled(mean_rows, "zspa original")
    sections.append((f"Position ids of kept tokens (ZSPAPrune, α = {default_alpha:g})", markdown_table(position_rows)))

    report = [f"# Pruning quality on {args.dataset} ({len(items)} test questions, {len(ablation_items)} for the "
              f"ablations; {model})\n\n", headline_text(result)]
    report += [f"\n## {title}\n\n{body}" for title, body in sections]
    (out / "report.md").write_text("".join(report))
    (out / "results.json").write_text(json.dumps({
        "dataset": args.dataset, "model": model, "questions": len(items), "headline": result, "methods": table,
        "alpha": alpha_rows, "pooling": pooling_rows, "positions": position_rows}, indent=1))
    print("".join(report))
    print(f"wrote {out / 'report.md'}, results.json and accuracy.png (work dir {work})")


if __name__ == "__main__":
    main()
