"""What the synthetic benchmarks share: the example record, drawing, and the JSONL writer/CLI."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# The palette and the shapes both benchmarks draw (draw_shape knows each of them).
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond")


@dataclass(frozen=True)
class Example:
    question: str
    answer: str
    kind: str
    objects: tuple


@dataclass(frozen=True)
class QuestionSet:
    """How a benchmark asks: `scene(split, index)` → (objects, generator after drawing them),
    `ask(objects, kind, generator)` → (question, answer), the kinds in rotation, the split seeds."""

    scene: Callable
    ask: Callable
    kinds: tuple[str, ...]
    split_seeds: dict[str, int]

    def example(self, split: str, index: int) -> Example:
        """Example `index`: its scene and one question, kinds in rotation."""
        objects, rng = self.scene(split, index)
        kind = self.kinds[index % len(self.kinds)]
        return Example(*self.ask(objects, kind, rng), kind, objects)

    def training_turns(self, split: str, index: int) -> list[tuple[str, str]]:
        """Example `index`'s question first, then one question of every other kind about the same
        scene: several supervised answers per image for the cost of one vision pass."""
        first = self.example(split, index)
        objects, _ = self.scene(split, index)
        rng = np.random.default_rng([self.split_seeds[split], index, 1])
        others = [self.ask(objects, kind, rng) for kind in self.kinds if kind != first.kind]
        return [(first.question, first.answer), *others]


def textured_background(size: int, rng: np.random.Generator) -> Image.Image:
    """Light grey noise with a slight per-image tint, so no patch is perfectly flat."""
    background = 200 + rng.integers(0, 30, size=(size, size, 1)) + rng.integers(0, 8, (1, 1, 3))
    return Image.fromarray(background.astype(np.uint8), "RGB")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([((x0 + x1) // 2, y0), (x1, (y0 + y1) // 2), ((x0 + x1) // 2, y1), (x0, (y0 + y1) // 2)],
                     fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def write_jsonl(directory: Path, split: str, count: int, example: Callable[[str, int], Example],
                image_for: Callable[[str, int], Image.Image]) -> Path:
    """Writes `count` examples as PNGs plus a `zspa-eval` data file (with each question's kind),
    and the same rows as `metadata.jsonl` so that the folder also loads with `datasets`'
    imagefolder builder (lmms-eval's local tasks); returns the .jsonl path."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        ex = example(split, index)
        name = f"{split}-{index:05d}.png"
        image_for(split, index).save(directory / name)
        rows.append({"image": name, "question": ex.question, "answer": ex.answer, "kind": ex.kind})
    path = directory / f"{split}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (directory / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": row["image"], **{k: v for k, v in row.items() if k != "image"}}) + "\n"
        for row in rows))
    return path


def dataset_cli(name: str, example: Callable[[str, int], Example],
                image_for: Callable[[str, int], Image.Image], argv: list[str] | None = None) -> Path:
    """`python -m zspa.datasets.NAME --split test --count N --out DIR`."""
    parser = argparse.ArgumentParser(prog=f"python -m zspa.datasets.{name}",
                                     description=f"Writes {name} examples (PNGs + JSONL) for zspa-eval --data.")
    parser.add_argument("--split", choices=["train", "test"], default="test")
    parser.add_argument("--count", type=int, default=1000, help="number of examples (default: 1000)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    path = write_jsonl(args.out, args.split, args.count, example, image_for)
    print(f"wrote {args.count} {args.split} examples to {path}")
    return path
