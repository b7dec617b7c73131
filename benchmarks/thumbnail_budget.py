"""Where ZSPAPrune spends an image's budget when the image is shown twice, as detail pieces and as
one whole view at less detail (issue 23): InternVL's tiles and its thumbnail, or Gemma 3's
pan&scan crops and the original image. For each image it prints the pieces (tiles or views), the
budget K, and how many of the relevance core's and of the diversity stage's picks land in the
whole view's tokens, against that view's share of the image's tokens; then, for the diversity
stage's picks there, the highest cosine similarity each has to a kept detail token (near 1: a
duplicate of something already kept).

The picks are the bundle's own pruner graph's, on its own vision-graph output; the relevance core
is the same graph at α = 1 given the core's budget (its K highest-relevance tokens, ties to the
lower index, exactly the core ZSPAPrune seeds with). So a bundle of a real checkpoint
(`zspa-export --model internvl3-1b`) measures the real model; the default tiny model has random
weights, so its figures say how the method treats the thumbnail's geometry, not what a trained
tower sees.

    python benchmarks/thumbnail_budget.py [--model tiny-random-gemma3 | --bundle DIR] [--keep 0.1] [--images a.jpg ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_machine  # noqa: E402

QUESTION = "What is written on the sign?"


def _images(paths: list[str]):
    from PIL import Image

    if paths:
        return [(Path(p).name, Image.open(p)) for p in paths]
    import matplotlib.cbook

    photo = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    sizes = [(896, 448), (1344, 896), (512, 600), (1280, 720), (2560, 720), (400, 1300)]
    return [(f"photo {w}x{h}", photo.resize((w, h))) for w, h in sizes]


def whole_view(pipeline, vision_input) -> tuple[int, int]:
    """[start, end) of the whole-image view's tokens: InternVL's thumbnail (its last tile), Gemma
    3's original image (its first view); empty when the image is not cut into pieces."""
    per_piece = pipeline.bundle.manifest.vision.tokens_per_tile
    n = vision_input.num_tokens
    if n == per_piece:
        return n, n
    return (0, per_piece) if pipeline.bundle.manifest.vision.kind == "gemma3" else (n - per_piece, n)


def core_graph(pipeline, hidden: int, dtype: str):
    """ZSPAPrune at α = 1 with the bundle's pooling: fed the core's budget, its picks are the core."""
    import onnxruntime as ort

    from zspa.pruning.onnx_pruner import build_pruner

    pooling = pipeline.bundle.pruner_for(0.5, "zspa").params["pooling"]
    model = build_pruner("zspa", {"relevance_ratio": 1.0, "pooling": pooling}, hidden=hidden, dtype=dtype)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def measure(pipeline, image, keep: float) -> dict:
    from zspa.pruning.budget import core_size, token_budget

    pruner = pipeline.bundle.pruner_for(keep, "zspa")
    vision_input = pipeline.kind.prepare(image, pipeline.bundle.manifest.vision)
    features = pipeline.vision.run(vision_input.feeds)[0]
    prompt = pipeline.prompts.build(QUESTION, views=(vision_input.views,))
    feeds = {"image_features": features, "prompt_embeds": pipeline.embed.run({"input_ids": prompt.input_ids[None]})[0],
             "prompt_mask": prompt.question_mask[None]}
    n, k = features.shape[1], token_budget(keep, features.shape[1])
    kept = pipeline.pruners[pruner.graph].run({**feeds, "budget": np.array([k], np.int64)})[1][0]
    core_count = core_size(k, pruner.params["relevance_ratio"])
    core = core_graph(pipeline, features.shape[-1], str(features.dtype)).run(
        None, {**feeds, "budget": np.array([core_count], np.int64)})[1][0]
    tokens = features[0].astype(np.float32)
    tokens /= np.maximum(np.linalg.norm(tokens, axis=-1, keepdims=True), 1e-12)
    core, diversity = set(core.tolist()), [int(i) for i in kept if int(i) not in set(core.tolist())]
    start, end = whole_view(pipeline, vision_input)
    detail_kept = [int(i) for i in kept if not start <= i < end]
    whole_diversity = [i for i in diversity if start <= i < end]
    closest = (tokens[whole_diversity] @ tokens[detail_kept].T).max(-1) if whole_diversity else []
    return {"pieces": n // pipeline.bundle.manifest.vision.tokens_per_tile, "n": n, "k": k, "share": (end - start) / n,
            "core": (sum(start <= i < end for i in core), len(core)),
            "diversity": (len(whole_diversity), len(diversity)), "closest": closest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=None, help="an InternVL or Gemma 3 bundle (default: --model, exported)")
    parser.add_argument("--model", default="tiny-random-internvl3",
                        choices=["tiny-random-internvl3", "tiny-random-gemma3"],
                        help="the built-in model exported when no --bundle is given (Gemma 3 with pan&scan on)")
    parser.add_argument("--keep", type=float, default=0.1)
    parser.add_argument("--images", nargs="*", default=[])
    args = parser.parse_args()
    from zspa.runtime.pipeline import Pipeline

    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle
        if bundle is None:
            from zspa.export.exporter import ExportOptions, export_bundle

            bundle = Path(tmp) / "bundle"
            pan_and_scan = True if args.model == "tiny-random-gemma3" else None
            export_bundle(ExportOptions(args.model, bundle, keeps=[args.keep], pan_and_scan=pan_and_scan,
                                        progress=False))
        pipeline = Pipeline.load(bundle)
        print(f"{pipeline.bundle.manifest.source.model_id}, keep {args.keep}; {describe_machine()}")
        print(f"{'image':>18} {'pieces':>6} {'N':>5} {'K':>4}  whole-view share  core in whole view  "
              "diversity in whole view  their closest kept detail token (cos, median / max)")
        for name, image in _images(args.images):
            m = measure(pipeline, image, args.keep)
            closest = (f"{np.median(m['closest']):.2f} / {np.max(m['closest']):.2f}" if len(m["closest"]) else "-")
            print(f"{name:>18} {m['pieces']:>6} {m['n']:>5} {m['k']:>4}  {m['share']:>16.1%}  "
                  f"{m['core'][0]:>8} of {m['core'][1]:<6}  {m['diversity'][0]:>11} of {m['diversity'][1]:<8}  "
                  f"{closest}")


if __name__ == "__main__":
    main()
