"""Decode speed of the three decoder KV caches on onnxruntime, on the same weights.

`concat` (the portable past → past + new graph), `shared` (GroupQueryAttention over in-place
buffers, reading each row's valid prefix) and `static` (opset 24's TensorScatter + Attention over
in-place buffers, TensorRT's form, attending over the whole capacity under a mask), exported from
one random-weight LLaVA-1.5-shaped model (576 visual tokens, a 1024 × 8 decoder), run at keep 0.1
and 1.0 with a `--max-context` capacity. Prints decode tokens/s and time to first token per kind,
and each in-place kind over `concat` round by round.

Each measurement runs in a fresh process; the kinds alternate over `--rounds`; figures are
median (min, max) over rounds, with the machine named.

    pip install -e ".[dev]" && python benchmarks/kv_caches.py [--rounds 3] [--tokens 64] [--max-context 1024]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from isolation import alternate, ratios, run_worker, spread  # noqa: E402
from llava_shaped import IMAGE, QUESTION, add_model_arguments, build_llava_shaped  # noqa: E402
from machine import describe_machine  # noqa: E402

KINDS = ("concat", "shared", "static")


def worker_decode(args) -> dict:
    """One generation of `--tokens` tokens after a warm-up; its decode tokens/s, TTFT and context."""
    from zspa.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(args.bundle, max_context=args.max_context)
    pipeline.generate(IMAGE, QUESTION, keep=args.keep, max_new_tokens=4, ignore_eos=True)
    stats = pipeline.generate(IMAGE, QUESTION, keep=args.keep, max_new_tokens=args.tokens, ignore_eos=True).stats
    return {"tokens_per_s": stats.decode_tokens_per_s, "ttft_ms": stats.time_to_first_token_ms,
            "context": stats.prompt_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds, a fresh process per side")
    parser.add_argument("--tokens", type=int, default=64, help="tokens decoded per measurement (default: 64)")
    parser.add_argument("--max-context", type=int, default=1024, help="the in-place caches' capacity (default: 1024)")
    parser.add_argument("--worker", choices=["decode"], help=argparse.SUPPRESS)
    parser.add_argument("--bundle", help=argparse.SUPPRESS)
    parser.add_argument("--keep", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker_decode(args)))
        return

    print(f"machine: {describe_machine()}")
    print(f"onnxruntime CPU, fp32, capacity {args.max_context}; {args.rounds} rounds, a process per measurement, "
          f"{args.tokens} tokens each; median (min, max) over rounds")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        size = {"text_hidden": args.text_hidden, "text_layers": args.text_layers, "keeps": [0.1]}
        _, _, concat = build_llava_shaped(work, "n576", **size)
        bundles = {"concat": concat}
        for kind in KINDS[1:]:
            from zspa.export.exporter import ExportOptions, export_bundle

            bundles[kind] = work / f"n576-{kind}"
            export_bundle(ExportOptions(str(work / "n576-model"), bundles[kind], keeps=[0.1], kv_cache=kind,
                                        progress=False))
        for keep in (0.1, 1.0):
            runs: dict[str, list[dict]] = {kind: [] for kind in KINDS}

            def measure(kind: str, keep: float, runs: dict[str, list[dict]]) -> float:
                result = run_worker(__file__, "decode", bundle=bundles[kind], keep=keep, tokens=args.tokens,
                                    max_context=args.max_context)
                runs[kind].append(result)
                return result["tokens_per_s"]

            rates = alternate({kind: functools.partial(measure, kind, keep, runs) for kind in KINDS}, args.rounds)
            print(f"\nkeep {keep:g} (context {runs['concat'][0]['context']}):")
            for kind in KINDS:
                line = (f"  {kind:6}: decode {spread(rates[kind], 1)} tokens/s, TTFT "
                        f"{spread([r['ttft_ms'] for r in runs[kind]], 0)} ms")
                if kind != "concat":
                    line += f"; decode / concat {spread(ratios(rates[kind], rates['concat']))}x"
                print(line)


if __name__ == "__main__":
    main()
