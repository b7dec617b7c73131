"""`zspa-export`: Hugging Face VLM → zspa bundle."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from zspa.cli.common import (
    add_debug_flag,
    add_signing_flags,
    int_list,
    method_list,
    ratio_list,
    run_command,
    signing_key,
)
from zspa.families import MODEL_ALIASES, TINY_MODELS
from zspa.pruning import METHOD_DEFAULTS, METHODS


def build_parser() -> argparse.ArgumentParser:
    aliases = ", ".join(f"{k} → {v}" for k, v in MODEL_ALIASES.items())
    parser = argparse.ArgumentParser(
        prog="zspa-export",
        description="Export a vision-language model to a zspa bundle: vision, embed, ZSPAPrune pruner and "
        "decoder ONNX graphs, tokenizer, preprocessing and a manifest, checked against transformers.",
    )
    parser.add_argument("--model", required=True,
                        help=f"Hugging Face id, local save_pretrained directory, alias ({aliases}), "
                        "or a built-in model (offline): shapes-llava, needles-llava (trained), "
                        f"{', '.join(TINY_MODELS)} (random weights)")
    parser.add_argument("-o", "--output", type=Path, help="bundle directory (default: bundles/<model name>)")
    parser.add_argument("--keep", type=ratio_list, default=None,
                        help="default keep ratio(s), comma-separated (default: 0.1); the pruner graphs run any "
                             "keep per request")
    parser.add_argument("--keep-tokens", type=int_list, default=[], metavar="N",
                        help="default budget(s) as token counts, instead of or besides --keep")
    parser.add_argument("--method", type=method_list, default=["zspa"], metavar="NAMES",
                        help=f"pruning method(s), comma-separated, one graph each: {', '.join(METHODS)} "
                        "(default: zspa)")
    zspa_defaults = METHOD_DEFAULTS["zspa"]
    parser.add_argument("--relevance-ratio", type=float, default=zspa_defaults["relevance_ratio"], metavar="ALPHA",
                        help="share of the budget chosen for prompt relevance, the rest for diversity "
                        f"(default: {zspa_defaults['relevance_ratio']})")
    parser.add_argument("--pooling", choices=["mean", "max"], default=zspa_defaults["pooling"],
                        help="how question-token embeddings are pooled for relevance (default: mean)")
    parser.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="graph precision (default: fp32)")
    parser.add_argument("--kv-cache", choices=["concat", "shared", "static"], default="concat",
                        help="decoder KV cache: concat (past → past+new; portable, any TensorRT 10), shared "
                        "(one in-place buffer per layer through onnxruntime's GroupQueryAttention; faster decode on "
                        "onnxruntime, not buildable by TensorRT) or static (one in-place buffer per layer through "
                        "opset 24's TensorScatter + Attention: fixed shapes per decode step, for TensorRT 10.15 or "
                        "newer; onnxruntime runs it too) (default: concat)")
    parser.add_argument("--min-pixels", type=int, default=None, metavar="N",
                        help="Qwen-VL: the fewest pixels an image is resized to (default: the checkpoint's)")
    parser.add_argument("--max-pixels", type=int, default=None, metavar="N",
                        help="Qwen-VL: the most pixels an image is resized to, so at most N / (patch·merge)² visual "
                             "tokens (default: the checkpoint's; Qwen3-VL's allow 16,384 tokens)")
    parser.add_argument("--max-tiles", type=int, default=None, metavar="N",
                        help="InternVL: the most 448 px tiles an image is cut into, so at most 256·(N+1) visual "
                             "tokens with the thumbnail (default: the checkpoint's; InternVL3's 12 give 3,328)")
    parser.add_argument("--pan-and-scan", choices=("on", "off"), default=None,
                        help="Gemma 3: also show wide or tall images as 2–4 crops, each its own 256-token block "
                             "(default: the checkpoint's preprocessor_config.json; the released ones: off)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset for every graph (default: 18)")
    parser.add_argument("--revision", help="hub revision (branch, tag or commit) to export")
    parser.add_argument("--force", action="store_true", help="replace an existing bundle at the output path")
    add_signing_flags(parser.add_argument_group("signing (as zspa-sign does)"), prefix="sign-")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_debug_flag(parser)
    return parser


def _default_output(model: str) -> Path:
    return Path("bundles") / Path(model.rstrip("/")).name


def _export(args: argparse.Namespace) -> None:
    from zspa.export.exporter import ExportOptions, export_bundle

    keeps = args.keep if args.keep is not None else ([] if args.keep_tokens else [0.1])
    options = ExportOptions(
        model=args.model, output=args.output or _default_output(args.model), keeps=keeps,
        keep_tokens=args.keep_tokens, methods=args.method, relevance_ratio=args.relevance_ratio, pooling=args.pooling,
        dtype=args.dtype, kv_cache=args.kv_cache, opset=args.opset, force=args.force, revision=args.revision,
        signing=signing_key(args, prefix="sign-"), progress=not args.quiet, min_pixels=args.min_pixels,
        max_pixels=args.max_pixels, max_tiles=args.max_tiles,
        pan_and_scan=None if args.pan_and_scan is None else args.pan_and_scan == "on",
    )
    started = time.perf_counter()
    report = export_bundle(options)
    manifest = report.manifest
    print(f"bundle: {report.path}  ({time.perf_counter() - started:.1f} s)")
    print(f"{'graph':<22}{'nodes':>8}{'size':>12}")
    for name in manifest.graphs:
        print(f"{name:<22}{report.node_counts[name]:>8}{report.sizes[name] / 1e6:>10.2f} MB")
    for pruner in manifest.pruners:
        print(f"pruner {pruner.method}: keep {pruner.keep:g} by default, any keep per request "
              f"(N={manifest.vision.num_tokens})")
    print("parity vs transformers (max abs diff): "
          + ", ".join(f"{k.removesuffix('_max_abs_diff')} {v:.2e}" for k, v in manifest.parity.items()))
    if manifest.source.random_weights:
        print(f"note: {manifest.source.model_id} has random weights; its answers are gibberish")


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), _export, argv)


if __name__ == "__main__":
    sys.exit(main())
