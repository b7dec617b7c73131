"""Where ZSPAPrune spends an InternVL image's budget: its tiles, or the thumbnail that shows the
whole image again at a quarter of the detail (issue 23). For each image it prints the tiles, the
budget K, and how many of the relevance core's and of the diversity stage's picks land in the
thumbnail's 256 tokens, against the thumbnail's share of the image's tokens; then, for the
diversity stage's thumbnail picks, the highest cosine similarity each has to a kept tile token
(near 1: a duplicate of something already kept).

The picks are the eager selector's (`zspa.pruning.zspa_prune`, what the pruner graph is exported
from) on the bundle's own vision-graph output, so a bundle of a real checkpoint
(`zspa-export --model internvl3-1b`) measures the real model; the default tiny model has random
weights, so its figures say how the method treats the thumbnail's geometry, not what a trained
tower sees.

    python benchmarks/thumbnail_budget.py [--bundle DIR] [--keep 0.1] [--images a.jpg b.png ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_machine  # noqa: E402

QUESTION = "What is written on the sign?"


def _images(paths: list[str]):
    from PIL import Image

    if paths:
        return [(Path(p).name, Image.open(p)) for p in paths]
    import matplotlib.cbook

    photo = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    return [(f"photo {w}x{h}", photo.resize((w, h))) for w, h in [(896, 448), (1344, 896), (512, 600), (1280, 720)]]


def measure(pipeline, image, keep: float) -> dict:
    from zspa.pruning.budget import core_size, token_budget
    from zspa.pruning.zspa_prune import farthest_point_fill, greedy_top, question_relevance

    spec = next(p for p in pipeline.bundle.manifest.pruners if p.method == "zspa").params
    vision_input = pipeline.kind.prepare(image, pipeline.bundle.manifest.vision)
    tiles = vision_input.grid[0]
    features = torch.from_numpy(pipeline.vision.run(vision_input.feeds)[0])
    prompt = pipeline.prompts.build(QUESTION)
    embeds = torch.from_numpy(pipeline.embed.run({"input_ids": prompt.input_ids[None]})[0])
    tokens = F.normalize(features.float(), dim=-1)
    n, k = tokens.shape[1], token_budget(keep, tokens.shape[1])
    relevance = question_relevance(tokens, embeds, torch.from_numpy(prompt.question_mask)[None], spec["pooling"])
    core = greedy_top(relevance, core_size(k, spec["relevance_ratio"]))
    kept = farthest_point_fill(tokens, core, k)[0].numpy()
    core, diversity = set(core[0].tolist()), [int(i) for i in kept if int(i) not in set(core[0].tolist())]
    thumbnail_start = n - 256 if tiles > 1 else n  # the thumbnail is the last tile, when there is one
    tile_kept = [int(i) for i in kept if i < thumbnail_start]
    thumb_diversity = [i for i in diversity if i >= thumbnail_start]
    closest = (tokens[0, thumb_diversity] @ tokens[0, tile_kept].T).amax(-1).numpy() if thumb_diversity else []
    return {"tiles": tiles, "n": n, "k": k, "share": (n - thumbnail_start) / n,
            "core": (sum(i >= thumbnail_start for i in core), len(core)),
            "diversity": (len(thumb_diversity), len(diversity)), "closest": closest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=None, help="an InternVL bundle (default: tiny-random-internvl3, exported)")
    parser.add_argument("--keep", type=float, default=0.1)
    parser.add_argument("--images", nargs="*", default=[])
    args = parser.parse_args()
    from zspa.runtime.pipeline import Pipeline

    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle
        if bundle is None:
            from zspa.export.exporter import ExportOptions, export_bundle

            bundle = Path(tmp) / "internvl"
            export_bundle(ExportOptions("tiny-random-internvl3", bundle, keeps=[args.keep], progress=False))
        pipeline = Pipeline.load(bundle)
        print(f"{pipeline.bundle.manifest.source.model_id}, keep {args.keep}; {describe_machine()}")
        print(f"{'image':>18} {'tiles':>5} {'N':>5} {'K':>4}  thumbnail share  core in thumbnail  "
              "diversity in thumbnail  their closest kept tile token (cos, median / max)")
        for name, image in _images(args.images):
            m = measure(pipeline, image, args.keep)
            closest = (f"{np.median(m['closest']):.2f} / {np.max(m['closest']):.2f}" if len(m["closest"]) else "-")
            print(f"{name:>18} {m['tiles']:>5} {m['n']:>5} {m['k']:>4}  {m['share']:>15.1%}  "
                  f"{m['core'][0]:>8} of {m['core'][1]:<6}  {m['diversity'][0]:>11} of {m['diversity'][1]:<8}  "
                  f"{closest}")


if __name__ == "__main__":
    main()
