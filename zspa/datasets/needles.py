"""Needles: many small objects on a 16×16-patch image, and questions about one of them.

Each 224 px image (16×16 patches of 14 px) holds 8–24 objects, every one a distinct
(colour, shape) pair drawn inside one patch or one aligned 2×2 block of patches, so the other
objects are distractors sharing the target's colour or its shape. A question concerns one object
(or one colour): its colour, its shape, its region of a 3×3 grid, whether a described object is
present, or how many objects have a colour. At LLaVA's 10 % budget (25 of 256 tokens) a pruner
cannot keep every object, so the benchmark rewards keeping the ones the question points at.
Examples are a pure function of (split, index): splits never overlap, and any example
regenerates anywhere. numpy + pillow only.

    python -m zspa.datasets.needles --split test --count 1000 --out DIR   # zspa-eval --data DIR/test.jsonl
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
from PIL import Image, ImageDraw

from zspa.datasets import common
from zspa.datasets.common import COLOURS, SHAPES, Example, QuestionSet, dataset_cli, draw_shape, textured_background

# A 3×3 grid of named regions over the 16×16 patch grid: patch rows/columns 0–4, 5–10, 11–15.
REGION_BOUNDS = (0, 5, 11, 16)
REGIONS = ("top-left", "top", "top-right", "left", "centre", "right", "bottom-left", "bottom", "bottom-right")
COUNT_WORDS = ("zero", "one", "two", "three", "four")
QUESTION_KINDS = ("colour", "shape", "where", "exists", "count")
CAPTION_PROMPT = "list the objects ."
SPLIT_SEEDS = {"train": 11, "test": 12}
PATCH = 14
GRID = 16
IMAGE_SIZE = PATCH * GRID
MIN_OBJECTS, MAX_OBJECTS = 8, 24


@dataclass(frozen=True)
class Needle:
    colour: str
    shape: str
    region: str
    cell: tuple[int, int]  # (row, column) of its top-left patch
    span: int  # 1: one patch; 2: a 2×2 block
    box: tuple[int, int, int, int]  # pixel box the shape is drawn in

    def patches(self) -> list[tuple[int, int]]:
        """(row, column) of every patch the object lies in."""
        row, col = self.cell
        return [(row + dr, col + dc) for dr in range(self.span) for dc in range(self.span)]


def vocabulary() -> list[str]:
    """Every word a prompt, answer or caption can hold, for a word-level tokenizer."""
    words = {"USER", ":", "ASSISTANT", "?", ".", ",", "what", "colour", "is", "the", "shape", "in", "where", "there",
             "a", "how", "many", "objects", "object", "are", "list", "yes", "no"}
    return sorted(words | set(COLOURS) | set(SHAPES) | set(REGIONS) | set(COUNT_WORDS))


def example(split: str, index: int) -> Example:
    """The benchmark's example `index`: its scene and one question, kinds in rotation."""
    return _QUESTIONS.example(split, index)


def training_turns(split: str, index: int) -> list[tuple[str, str]]:
    """Example `index`'s question first, then one of every other kind about the same scene."""
    return _QUESTIONS.training_turns(split, index)


def caption(objects: tuple[Needle, ...]) -> str:
    """Every object as 'colour shape region', the alignment stage's target. Listed by colour then
    shape (a fixed order): naming the next object is then a lookup by content, the skill the
    questions need, where reading order would first need a hard 'next in raster order' search
    (measured: with raster order the loss sat at the image-blind level for the first 10 minutes)."""
    ordered = sorted(objects, key=lambda o: (list(COLOURS).index(o.colour), SHAPES.index(o.shape)))
    return " , ".join(f"{o.colour} {o.shape} {o.region}" for o in ordered) + " ."


def scene(split: str, index: int, count: tuple[int, int] = (MIN_OBJECTS, MAX_OBJECTS), crowded: bool = False
          ) -> tuple[tuple[Needle, ...], np.random.Generator]:
    """8–24 objects (`count`: fewer for a training curriculum) with distinct (colour, shape) pairs
    on non-overlapping patches, drawn again
    (from the same generator, so still a function of the index) in the rare case where no object
    can be named by shape and region, or by colour and region. `crowded` (training only): the pairs
    come from as few colours and shapes as hold them, so even a small scene repeats its colours and
    shapes and a question naming a region cannot be answered without reading it."""
    rng = np.random.default_rng([SPLIT_SEEDS[split], index])
    while True:
        objects = _place(rng, *count, crowded=crowded)
        if _unique(objects, _same_shape_and_region) and _unique(objects, _same_colour_and_region):
            return objects, rng


def _place(rng: np.random.Generator, fewest: int, most: int, crowded: bool = False) -> tuple[Needle, ...]:
    count = int(rng.integers(fewest, most + 1))
    pairs = _crowded_pairs(rng, count) if crowded else [(c, s) for c in COLOURS for s in SHAPES]
    chosen = rng.choice(len(pairs), size=count, replace=False)
    taken = np.zeros((GRID, GRID), dtype=bool)
    objects = []
    for pair in chosen:
        span = 2 if rng.random() < 0.3 else 1
        row, col = _free_cell(taken, span, rng)
        taken[row:row + span, col:col + span] = True
        colour, shape = pairs[pair]
        objects.append(Needle(colour, shape, _region(row, col), (row, col), span, _box(row, col, span, rng)))
    return tuple(objects)


def _crowded_pairs(rng: np.random.Generator, count: int) -> list[tuple[str, str]]:
    """Every (colour, shape) pair of a random palette just large enough for `count` objects: either
    side drawn first at 1 up to its maximum, the other as small as the count allows."""
    if rng.integers(2):
        colours = int(rng.integers(max(1, -(-count // len(SHAPES))), len(COLOURS) + 1))
        shapes = -(-count // colours)
    else:
        shapes = int(rng.integers(max(1, -(-count // len(COLOURS))), len(SHAPES) + 1))
        colours = -(-count // shapes)
    palette = rng.choice(list(COLOURS), size=colours, replace=False)
    forms = rng.choice(SHAPES, size=shapes, replace=False)
    return [(str(c), str(s)) for c in palette for s in forms]


def _free_cell(taken: np.ndarray, span: int, rng: np.random.Generator) -> tuple[int, int]:
    """A random free top-left patch whose span×span block is free and inside one region."""
    size = GRID - span + 1
    blocked = np.zeros((size, size), dtype=bool)
    for dr in range(span):
        for dc in range(span):
            blocked |= taken[dr:dr + size, dc:dc + size]
    inside = np.array([_inside_one_region(start, span) for start in range(size)])
    rows, cols = np.nonzero(~blocked & inside[:, None] & inside[None, :])
    pick = int(rng.integers(len(rows)))
    return int(rows[pick]), int(cols[pick])


def _inside_one_region(start: int, span: int) -> bool:
    return _band(start) == _band(start + span - 1)


def _band(patch_index: int) -> int:
    return int(np.searchsorted(REGION_BOUNDS, patch_index, side="right")) - 1


def _region(row: int, col: int) -> str:
    return REGIONS[3 * _band(row) + _band(col)]


def _box(row: int, col: int, span: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A square of 10–12 px (one patch) or 22–26 px (2×2) at a random offset within its patches."""
    size = int(rng.integers(10, 13)) if span == 1 else int(rng.integers(22, 27))
    room = span * PATCH - size
    x0 = col * PATCH + int(rng.integers(0, room + 1))
    y0 = row * PATCH + int(rng.integers(0, room + 1))
    return x0, y0, x0 + size - 1, y0 + size - 1


def ask(objects: tuple[Needle, ...], kind: str, rng: np.random.Generator) -> tuple[str, str]:
    """A question of `kind` that the scene answers unambiguously, and its one-word answer."""
    if kind == "colour":  # identified by shape and region: pick one whose shape is unique in its region
        target = _pick(_unique(objects, _same_shape_and_region), rng)
        return f"what colour is the {target.shape} in the {target.region} ?", target.colour
    if kind == "shape":
        target = _pick(_unique(objects, _same_colour_and_region), rng)
        return f"what shape is the {target.colour} object in the {target.region} ?", target.shape
    if kind == "where":
        target = _pick(objects, rng)
        return f"where is the {target.colour} {target.shape} ?", target.region
    if kind == "count":
        colour = str(rng.choice(list(COLOURS)))
        return f"how many {colour} objects are there ?", COUNT_WORDS[sum(o.colour == colour for o in objects)]
    present = {(o.colour, o.shape) for o in objects}
    # An absent pair whose colour and shape both occur in the scene: a distractor on each side.
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present
              and any(o.colour == c for o in objects) and any(o.shape == s for o in objects)]
    if absent and rng.integers(2):
        colour, shape = absent[int(rng.integers(len(absent)))]
        return f"is there a {colour} {shape} ?", "no"
    target = _pick(objects, rng)
    return f"is there a {target.colour} {target.shape} ?", "yes"


def _pick(objects, rng: np.random.Generator) -> Needle:
    return objects[int(rng.integers(len(objects)))]


def _same_shape_and_region(a: Needle, b: Needle) -> bool:
    return (a.shape, a.region) == (b.shape, b.region)


def _same_colour_and_region(a: Needle, b: Needle) -> bool:
    return (a.colour, a.region) == (b.colour, b.region)


def _unique(objects: tuple[Needle, ...], same) -> list[Needle]:
    """The objects that no other object matches under `same`: those a question can name."""
    return [o for o in objects if not any(same(o, other) for other in objects if other is not o)]


def render(objects: tuple[Needle, ...], seed: int = 0) -> Image.Image:
    image = textured_background(IMAGE_SIZE, np.random.default_rng(seed))
    draw = ImageDraw.Draw(image)
    for obj in objects:
        draw_shape(draw, obj.shape, obj.box, COLOURS[obj.colour])
    return image


_QUESTIONS = QuestionSet(scene, ask, QUESTION_KINDS, SPLIT_SEEDS)


def image_for(split: str, index: int) -> Image.Image:
    return render(scene(split, index)[0], seed=SPLIT_SEEDS[split] * 1_000_003 + index)


write_jsonl = partial(common.write_jsonl, example=example, image_for=image_for)

if __name__ == "__main__":
    dataset_cli("needles", example, image_for)
