"""Does pruning pay? Time to first token at keep 1.0, 0.25 and 0.1 on a LLaVA-1.5-shaped model.

A random-weight LLaVA with LLaVA-1.5's token geometry (336 px, 14 px patches → 576 visual
tokens) and a decoder wide enough that prefill dominates is saved with save_pretrained, exported
through `zspa-export`'s library path and run through the runtime. Prints measured ratios next to
the ratio predicted from token counts. Each keep runs in a fresh process, the keeps alternating
over `--rounds`; the table holds medians over rounds, the speed-ups their min and max too.

    python benchmarks/ttft.py [--text-hidden 1024 --text-layers 8 --rounds 3 --runs 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from isolation import alternate, ratios, run_worker, spread  # noqa: E402
from llava_shaped import IMAGE, QUESTION, add_model_arguments, build_llava_shaped  # noqa: E402
from machine import describe_machine  # noqa: E402

KEEPS = (1.0, 0.25, 0.1)


def worker(args) -> dict[str, float]:
    """Medians over `--runs` generations of one token at one keep, after a warm-up."""
    from zspa.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(args.bundle, threads=args.threads)
    pipeline.generate(IMAGE, QUESTION, keep=args.keep, max_new_tokens=1)
    samples = [pipeline.generate(IMAGE, QUESTION, keep=args.keep, max_new_tokens=1).stats for _ in range(args.runs)]
    return {
        "ttft": statistics.median(s.time_to_first_token_ms for s in samples),
        "prefill": statistics.median(s.timings_ms["prefill"] for s in samples),
        "prune": statistics.median(s.timings_ms["prune"] for s in samples),
        # preprocess + vision + embed + prune + sampling: does not shrink with K
        "fixed": statistics.median(s.time_to_first_token_ms - s.timings_ms["prefill"] for s in samples),
        "tokens": samples[0].prompt_tokens,
    }


def measure(bundle: Path, rounds: int, runs: int, threads: int | None) -> dict[float, list[dict[str, float]]]:
    results: dict[float, list[dict[str, float]]] = {keep: [] for keep in KEEPS}

    def side(keep: float):
        def run() -> float:
            results[keep].append(run_worker(__file__, "keep", bundle=bundle, keep=keep, runs=runs, threads=threads))
            return results[keep][-1]["ttft"]
        return run

    alternate({keep: side(keep) for keep in KEEPS}, rounds)
    return results


def report(rounds: dict[float, list[dict[str, float]]]) -> None:
    results = {keep: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for keep, runs in rounds.items()}
    full = results[1.0]
    print(f"\n{'keep':>6}{'prefill tokens':>16}{'TTFT ms':>10}{'prefill ms':>12}{'prune ms':>10}"
          f"{'TTFT ratio':>12}{'predicted':>11}{'prefill ratio':>15}{'token ratio':>13}")
    for keep, r in results.items():
        token_ratio = r["tokens"] / full["tokens"]
        # prediction: the stages before the decoder as measured, prefill scaled by its token count
        predicted = (r["fixed"] + full["prefill"] * token_ratio) / full["ttft"]
        print(f"{keep:>6g}{int(r['tokens']):>16}{r['ttft']:>10.1f}{r['prefill']:>12.1f}{r['prune']:>10.2f}"
              f"{r['ttft'] / full['ttft']:>12.3f}{predicted:>11.3f}{r['prefill'] / full['prefill']:>15.3f}"
              f"{token_ratio:>13.3f}")
    full_ttft = [r["ttft"] for r in rounds[1.0]]
    for keep in KEEPS[1:]:
        speedups = ratios(full_ttft, [r["ttft"] for r in rounds[keep]])
        print(f"speed-up of time to first token at keep {keep:g}: {spread(speedups)}x over rounds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds, a fresh process per keep")
    parser.add_argument("--worker", choices=["keep"], help=argparse.SUPPRESS)
    parser.add_argument("--bundle", help=argparse.SUPPRESS)
    parser.add_argument("--keep", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    print(f"machine: {describe_machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        _, _, bundle = build_llava_shaped(Path(tmp), "n576", text_hidden=args.text_hidden,
                                          text_layers=args.text_layers, keeps=[k for k in KEEPS if k < 1.0])
        report(measure(bundle, args.rounds, args.runs, args.threads))


if __name__ == "__main__":
    main()
