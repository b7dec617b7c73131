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

from llava_shaped import IMAGE, QUESTION, add_model_arguments, build_llava_shaped

KEEPS = (1.0, 0.25, 0.1)


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
    add_model_arguments(parser)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        _, _, bundle = build_llava_shaped(Path(tmp), "n576", text_hidden=args.text_hidden,
                                          text_layers=args.text_layers, keeps=[k for k in KEEPS if k < 1.0])
        report(measure(bundle, IMAGE, args.runs, args.threads))


if __name__ == "__main__":
    main()
