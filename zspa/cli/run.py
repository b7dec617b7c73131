"""`zspa-run`: one answer from a bundle, streamed, with timings. Imports no torch/transformers."""

from __future__ import annotations

import argparse
import json
import sys

from zspa.cli.common import add_backend_flags, add_debug_flag, backend_options, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zspa-run", description="Answer a prompt about images with a zspa bundle.")
    parser.add_argument("bundle", help="bundle directory written by zspa-export")
    parser.add_argument("--image", required=True, action="append", dest="images", metavar="IMAGE",
                        help="image file (JPEG, PNG, WebP); repeat for several, which the prompt gets in order")
    parser.add_argument("--prompt", required=True, help="the question about the images")
    parser.add_argument("--keep", type=float, default=None,
                        help="fraction of each image's visual tokens to keep, in (0, 1]; 1.0 disables pruning "
                             "(default: the smallest keep the bundle was exported with)")
    parser.add_argument("--method", default=None,
                        help="pruning method among the bundle's (default: the first it was exported with)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="default: 128")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None, help="sampling seed, for reproducible samples")
    parser.add_argument("--positions", choices=["contiguous", "original"], default=None,
                        help="position ids of kept visual tokens (default: the bundle's)")
    add_backend_flags(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    add_debug_flag(parser)
    return parser


def _run(args: argparse.Namespace) -> None:
    from zspa.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(args.bundle, **backend_options(args), positions=args.positions)
    stream = pipeline.generate(
        args.images, args.prompt, keep=args.keep, method=args.method, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed, stream=True,
    )
    for delta in stream:
        if not args.json:
            print(delta, end="", flush=True)
    result = stream.result
    stats = result.stats
    source = pipeline.bundle.manifest.source
    if args.json:
        print(json.dumps({
            "text": result.text,
            "finish_reason": result.finish_reason,
            "tokens_generated": stats.tokens_generated,
            "prompt_tokens": stats.prompt_tokens,
            "visual_tokens": {"total": stats.visual_tokens_total, "kept": stats.visual_tokens_kept},
            "kept_indices": result.kept_indices.tolist(),
            "timings_ms": {k: round(v, 3) for k, v in stats.timings_ms.items()},
            "time_to_first_token_ms": round(stats.time_to_first_token_ms, 3),
            "decode_tokens_per_s": round(stats.decode_tokens_per_s, 2),
            "random_weights": source.random_weights,
        }))
        return
    print(flush=True)
    t = stats.timings_ms
    print(
        f"[visual tokens {stats.visual_tokens_total}→{stats.visual_tokens_kept} | preprocess {t['preprocess']:.1f} ms, "
        f"vision {t['vision']:.1f} ms, prune {t['prune']:.1f} ms, prefill {t['prefill']:.1f} ms | "
        f"first token {stats.time_to_first_token_ms:.1f} ms | {stats.tokens_generated} tokens, "
        f"decode {stats.decode_tokens_per_s:.1f} tokens/s]",
        file=sys.stderr,
    )
    if source.random_weights:
        print(f"[{source.model_id} has random weights: the answer above is gibberish by design]", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
