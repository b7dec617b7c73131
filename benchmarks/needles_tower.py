"""Stage 0 of `needles-llava`'s training: a vision tower that sees before any language is learnt.

LLaVA's tower arrives pretrained (CLIP); trained from scratch together with a decoder, needles-llava's
tower never learnt to tell the objects apart (29–31 % of the questions, colour at chance). So the
tower is first trained alone, on what the generator knows about every patch: which object lies in
it (its colour × shape, or none: one patch of a small object, a quarter of a 2×2 one) and which of
the 3×3 regions the patch is in. Two linear heads read the layer the projector will read (feature
layer −2, CLS dropped), so what they need is in the visual tokens the decoder gets. Fresh scenes
every step; held-out accuracy on the test split's scenes, on object patches (the hard part: a
quarter of a shape) and on all. Saves the tower's weights for the later stages.

    python benchmarks/needles_tower.py [--minutes 15] [--out benchmarks/results/needles-training/tower.pt]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from zspa.datasets import needles
from zspa.datasets.common import COLOURS, SHAPES
from zspa.export.needles import build_untrained

from machine import describe_machine
from vlm_training import train_for

RESULTS = Path(__file__).resolve().parent / "results" / "needles-training"
OBJECT_CLASSES = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]  # class 0 is "no object"


def patch_labels(objects: tuple[needles.Needle, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Per patch, row-major: its object class (0: none, else 1 + colour × shape) and its region."""
    classes = np.zeros((needles.GRID, needles.GRID), dtype=np.int64)
    for obj in objects:
        for row, col in obj.patches():
            classes[row, col] = 1 + OBJECT_CLASSES.index(f"{obj.colour} {obj.shape}")
    bands = np.searchsorted(needles.REGION_BOUNDS, np.arange(needles.GRID), side="right") - 1
    regions = 3 * bands[:, None] + bands[None, :]
    return classes.reshape(-1), regions.reshape(-1)


class PatchProbe(nn.Module):
    """The tower, and two linear heads on the feature layer the projector reads."""

    def __init__(self, tower: nn.Module, feature_layer: int):
        super().__init__()
        self.tower, self.feature_layer = tower, feature_layer
        hidden = tower.config.hidden_size
        self.object_head = nn.Linear(hidden, 1 + len(OBJECT_CLASSES))
        self.region_head = nn.Linear(hidden, len(needles.REGIONS))

    def forward(self, pixel_values, classes=None, regions=None):
        features = self.tower(pixel_values, output_hidden_states=True).hidden_states[self.feature_layer][:, 1:]
        logits = self.object_head(features), self.region_head(features)
        if classes is None:
            return logits
        loss = sum(nn.functional.cross_entropy(scores.flatten(0, 1), target.flatten())
                   for scores, target in zip(logits, (classes, regions)))
        return SimpleNamespace(loss=loss)  # what train_for reads


def scenes(processor, split: str, indices: range) -> dict[str, torch.Tensor]:
    objects = [needles.scene(split, i)[0] for i in indices]
    images = [needles.render(o, seed=needles.SPLIT_SEEDS[split] * 1_000_003 + i) for o, i in zip(objects, indices)]
    labels = [patch_labels(o) for o in objects]
    return {"pixel_values": processor.image_processor(images, return_tensors="pt")["pixel_values"],
            "classes": torch.from_numpy(np.stack([c for c, _ in labels])),
            "regions": torch.from_numpy(np.stack([r for _, r in labels]))}


@torch.no_grad()
def patch_accuracy(probe: PatchProbe, processor, count: int = 200) -> dict[str, float]:
    """On `count` test scenes: object class on object patches and on all patches, region on all."""
    probe.eval()
    hits = {"object patches": [], "all patches": [], "region": []}
    for start in range(0, count, 50):
        inputs = scenes(processor, "test", range(start, min(count, start + 50)))
        object_logits, region_logits = probe(inputs["pixel_values"])
        right = object_logits.argmax(-1) == inputs["classes"]
        hits["object patches"] += right[inputs["classes"] > 0].tolist()
        hits["all patches"] += right.flatten().tolist()
        hits["region"] += (region_logits.argmax(-1) == inputs["regions"]).flatten().tolist()
    probe.train()
    return {name: float(np.mean(values)) for name, values in hits.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-scenes", type=int, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS / "tower.pt", help="the tower's state_dict")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model, processor = build_untrained(args.seed)
    probe = PatchProbe(model.model.vision_tower, model.config.vision_feature_layer)
    print(f"stage 0, the tower alone: {vars(args)}; {describe_machine()}, torch {torch.__version__}", flush=True)
    started = time.perf_counter()
    steps, curve = train_for(probe, probe.parameters(),
                             lambda step: scenes(processor, "train", range(step * args.batch_size,
                                                                         (step + 1) * args.batch_size)),
                             args.minutes, args.lr, log_every=50)
    result = patch_accuracy(probe, processor, args.test_scenes)
    minutes = (time.perf_counter() - started) / 60
    print(f"{steps} steps in {minutes:.1f} min; held-out accuracy on {args.test_scenes} test scenes: "
          + ", ".join(f"{k} {v:.4f}" for k, v in result.items()), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(probe.tower.state_dict(), args.out)
    args.out.with_suffix(".json").write_text(json.dumps({
        "settings": {k: str(v) for k, v in vars(args).items()}, "machine": describe_machine(), "steps": steps,
        "minutes": minutes, "held_out_accuracy": result, "curve": curve}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
