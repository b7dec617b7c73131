"""Shapes: images of coloured shapes in distinct quadrants, with questions about one object.

Each image holds three objects, each with its own colour, shape and quadrant (one quadrant stays
empty), on a lightly textured background. Every question is answered by one word and depends on
one object: its colour, its shape, where it is, or whether a given object is present. Examples
are a pure function of (split, index), so train and test never overlap and any example can be
regenerated anywhere. numpy + pillow only.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
from PIL import Image, ImageDraw

from zspa.datasets import common
from zspa.datasets.common import COLOURS, SHAPES, Example, QuestionSet, dataset_cli, draw_shape, textured_background

QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
QUESTION_KINDS = ("colour", "shape", "where", "exists")
SPLIT_SEEDS = {"train": 1, "test": 2}
IMAGE_SIZE = 224


@dataclass(frozen=True)
class ShapeObject:
    colour: str
    shape: str
    quadrant: str
    box: tuple[int, int, int, int]


def vocabulary() -> list[str]:
    """Every word a prompt or answer can hold, for a word-level tokenizer."""
    words = {"USER", ":", "ASSISTANT", "?", "what", "colour", "is", "the", "shape", "of", "object", "where",
             "there", "a", "yes", "no"}
    return sorted(words | set(COLOURS) | set(SHAPES) | set(QUADRANTS))


def example(split: str, index: int) -> Example:
    """The benchmark's example `index`: its scene and one question, kinds in rotation."""
    return _QUESTIONS.example(split, index)


def training_turns(split: str, index: int) -> list[tuple[str, str]]:
    """Example `index`'s question first, then one of every other kind about the same scene."""
    return _QUESTIONS.training_turns(split, index)


def _scene(split: str, index: int) -> tuple[tuple[ShapeObject, ...], np.random.Generator]:
    rng = np.random.default_rng([SPLIT_SEEDS[split], index])
    colours = rng.choice(list(COLOURS), size=3, replace=False)
    shapes = rng.choice(SHAPES, size=3, replace=False)
    quadrants = rng.choice(QUADRANTS, size=3, replace=False)
    objects = tuple(
        ShapeObject(str(c), str(s), str(q), _box(str(q), rng)) for c, s, q in zip(colours, shapes, quadrants)
    )
    return objects, rng


def ask(objects: tuple[ShapeObject, ...], kind: str, rng: np.random.Generator) -> tuple[str, str]:
    """A question of `kind` about one of `objects`, and its one-word answer."""
    target = objects[int(rng.integers(len(objects)))]
    if kind == "colour":
        return f"what colour is the {target.shape} ?", target.colour
    if kind == "shape":
        return f"what is the shape of the {target.colour} object ?", target.shape
    if kind == "where":
        return f"where is the {target.colour} {target.shape} ?", target.quadrant
    if rng.integers(2):
        return f"is there a {target.colour} {target.shape} ?", "yes"
    while True:  # an absent object: a colour and shape that no object in the scene combines
        colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
        if all((o.colour, o.shape) != (colour, shape) for o in objects):
            return f"is there a {colour} {shape} ?", "no"


def _box(quadrant: str, rng: np.random.Generator) -> tuple[int, int, int, int]:
    half = IMAGE_SIZE // 2
    size = int(rng.integers(44, 76))
    x0 = (half if quadrant.endswith("right") else 0) + int(rng.integers(6, half - size - 6))
    y0 = (half if quadrant.startswith("bottom") else 0) + int(rng.integers(6, half - size - 6))
    return x0, y0, x0 + size, y0 + size


def render(example_: Example, seed: int = 0) -> Image.Image:
    image = textured_background(IMAGE_SIZE, np.random.default_rng(seed))
    draw = ImageDraw.Draw(image)
    for obj in example_.objects:
        draw_shape(draw, obj.shape, obj.box, COLOURS[obj.colour])
    return image


_QUESTIONS = QuestionSet(_scene, ask, QUESTION_KINDS, SPLIT_SEEDS)


def image_for(split: str, index: int) -> Image.Image:
    return render(example(split, index), seed=SPLIT_SEEDS[split] * 1_000_003 + index)


write_jsonl = partial(common.write_jsonl, example=example, image_for=image_for)

if __name__ == "__main__":
    dataset_cli("shapes", example, image_for)
