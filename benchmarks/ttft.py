"""Does pruning pay? Time to first token at keep 1.0, 0.25 and 0.1 on a LLaVA-1.5-shaped model.

A random-weight LLaVA with LLaVA-1.5's token geometry (336 px, 14 px patches → 576 visual
tokens) and a decoder wide enough that prefill dominates is saved with save_pretrained, exported
through `zspa-export`'s library path and run through the runtime. Prints measured ratios next to
the ratio predicted from token counts, all from this one run (absolute times on a small CPU are
noisy; ratios measured together are not).

    python benchmarks/ttft.py [--text-hidden 1024 --text-layers 8 --runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

KEEPS = (1.0, 0.25, 0.1)
QUESTION = "What colour is the ball next to the house?"


def build_bundle(workdir: Path, text_hidden: int, text_layers: int) -> Path:
    from zspa.export.exporter import ExportOptions, export_bundle
    from zspa.export.tiny import build_model, build_processor

    processor = build_processor()
    model = build_model(processor, vision_hidden=128, text_hidden=text_hidden, text_layers=text_layers)
    source = workdir / "model"
    model.save_pretrained(source)
    processor.save_pretrained(source)
    params = sum(p.numel() for p in model.model.language_model.parameters()) / 1e6
    print(f"model: LLaVA-1.5 geometry, decoder hidden {text_hidden} x {text_layers} layers ({params:.0f} M params)")
    bundle = workdir / "bundle"
    export_bundle(ExportOptions(str(source), bundle, keeps=[k for k in KEEPS if k < 1.0]))
    return bundle


def measure(bundle: Path, image: Path, runs: int, threads: int | None) -> dict[float, dict[str, float]]:
    from zspa.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(bundle, threads=threads)
    results = {}
    for keep in KEEPS:
        pipeline.generate(image, QUESTION, keep=keep, max_new_tokens=1)  # warm-up
        samples = [pipeline.generate(image, QUESTION, keep=keep, max_new_tokens=1).stats for _ in range(runs)]
        results[keep] = {
            "ttft": statistics.median(s.time_to_first_token_ms for s in samples),
            "prefill": statistics.median(s.timings_ms["prefill"] for s in samples),
            "prune": statistics.median(s.timings_ms["prune"] for s in samples),
            "fixed": statistics.median(
                s.time_to_first_token_ms - s.timings_ms["prefill"] for s in samples
            ),  # preprocess + vision + embed + prune + sampling: does not shrink with K
            "tokens": samples[0].prompt_tokens,
        }
    return results


def report(results: dict[float, dict[str, float]]) -> None:
    full = results[1.0]
    print(f"\n{'keep':>6}{'prefill tokens':>16}{'TTFT ms':>10}{'prefill ms':>12}{'prune ms':>10}"
          f"{'TTFT ratio':>12}{'predicted':>11}{'prefill ratio':>15}{'token ratio':>13}")
    for keep, r in results.items():
        token_ratio = r["tokens"] / full["tokens"]
        # prediction: the stages before the decoder as measured, prefill scaled by its token count
        predicted = (r["fixed"] + full["prefill"] * token_ratio) / full["ttft"]
        print(f"{keep:>6g}{r['tokens']:>16}{r['ttft']:>10.1f}{r['prefill']:>12.1f}{r['prune']:>10.2f}"
              f"{r['ttft'] / full['ttft']:>12.3f}{predicted:>11.3f}{r['prefill'] / full['prefill']:>15.3f}"
              f"{token_ratio:>13.3f}")
    print(f"\nspeed-up of time to first token: keep 0.25 → {full['ttft'] / results[0.25]['ttft']:.2f}x, "
          f"keep 0.1 → {full['ttft'] / results[0.1]['ttft']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-hidden", type=int, default=1024)
    parser.add_argument("--text-layers", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    args = parser.parse_args()
    image = Path(__file__).resolve().parent.parent / "zspa" / "assets" / "example.png"
    with tempfile.TemporaryDirectory() as tmp:
        bundle = build_bundle(Path(tmp), args.text_hidden, args.text_layers)
        report(measure(bundle, image, args.runs, args.threads))


if __name__ == "__main__":
    main()
