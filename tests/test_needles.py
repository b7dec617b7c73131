"""The needles benchmark: many small objects, questions answerable from one of them, disjoint splits."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from zspa.datasets.needles import (
    COLOURS,
    COUNT_WORDS,
    PATCH,
    QUESTION_KINDS,
    REGIONS,
    SHAPES,
    ask,
    caption,
    example,
    image_for,
    scene,
    training_turns,
)
from zspa.export.needles import NEEDLES_MODEL_DIR


def region_of(row: int, col: int) -> str:
    """The 3×3 region of a patch, from the documented bounds (0–4, 5–10, 11–15), not the generator's."""
    band = lambda i: 0 if i < 5 else 1 if i < 11 else 2  # noqa: E731
    return REGIONS[3 * band(row) + band(col)]


def answer_from_scene(question: str, objects) -> str:
    """Re-derives the answer from the scene description, independently of the generator's code;
    fails on a question that names no object or more than one."""
    words = question.rstrip(" ?").split()

    def only(matches):
        assert len(matches) == 1, (question, matches)
        return matches[0]

    if question.startswith("what colour"):  # what colour is the SHAPE in the REGION
        return only([o.colour for o in objects if (o.shape, o.region) == (words[4], words[-1])])
    if question.startswith("what shape"):  # what shape is the COLOUR object in the REGION
        return only([o.shape for o in objects if (o.colour, o.region) == (words[4], words[-1])])
    if question.startswith("where"):
        return only([o.region for o in objects if (o.colour, o.shape) == (words[-2], words[-1])])
    if question.startswith("how many"):
        return COUNT_WORDS[sum(o.colour == words[2] for o in objects)]
    return "yes" if any((o.colour, o.shape) == (words[-2], words[-1]) for o in objects) else "no"


def test_examples_are_deterministic_and_splits_differ():
    assert example("test", 7) == example("test", 7)
    assert example("test", 7) != example("train", 7)
    assert np.array_equal(np.asarray(image_for("test", 3)), np.asarray(image_for("test", 3)))
    assert not np.array_equal(np.asarray(image_for("test", 3)), np.asarray(image_for("train", 3)))


def test_answers_follow_from_the_scene_and_kinds_rotate():
    kinds, counts, exists = [], [], []
    for index in range(300):
        ex = example("test", index)
        assert answer_from_scene(ex.question, ex.objects) == ex.answer
        assert 8 <= len(ex.objects) <= 24
        assert len({(o.colour, o.shape) for o in ex.objects}) == len(ex.objects)
        kinds.append(ex.kind)
        (exists if ex.kind == "exists" else counts if ex.kind == "count" else []).append(ex.answer)
        turns = training_turns("train", index)
        assert sorted(kind for kind in QUESTION_KINDS) == sorted(
            next(k for k in QUESTION_KINDS if _kind_of(q) == k) for q, _ in turns)
        for question, answer in turns:
            assert answer_from_scene(question, example("train", index).objects) == answer
    assert Counter(kinds) == dict.fromkeys(QUESTION_KINDS, 60)
    assert 0.35 < exists.count("yes") / len(exists) < 0.65
    assert len(set(counts)) >= 4  # counting is not one answer


def _kind_of(question: str) -> str:
    starts = {"what colour": "colour", "what shape": "shape", "where": "where", "is there": "exists",
              "how many": "count"}
    return next(kind for start, kind in starts.items() if question.startswith(start))


def test_absent_objects_share_a_colour_and_a_shape_with_present_ones():
    for index in range(3, 400, 5):  # the 'exists' questions
        ex = example("test", index)
        colour, shape = ex.question.rstrip(" ?").split()[-2:]
        if ex.answer == "no":
            assert any(o.colour == colour for o in ex.objects) and any(o.shape == shape for o in ex.objects)


def test_objects_are_small_and_drawn_where_the_scene_says():
    for index in range(30):
        ex, pixels = example("test", index), np.asarray(image_for("test", index))
        occupied = set()
        for obj in ex.objects:
            x0, y0, x1, y1 = obj.box
            assert tuple(pixels[(y0 + y1) // 2, (x0 + x1) // 2]) == COLOURS[obj.colour]
            patches = {(y // PATCH, x // PATCH) for y in (y0, y1) for x in (x0, x1)}
            assert patches <= set(obj.patches()) and len(obj.patches()) in (1, 4)
            assert not occupied & set(obj.patches())
            occupied |= set(obj.patches())
            assert {region_of(r, c) for r, c in obj.patches()} == {obj.region}


def test_crowded_training_scenes_make_questions_read_the_region():
    """Crowded scenes repeat colours and shapes even when small, so far more colour questions name
    a shape that occurs twice (only the region tells them apart); questions stay answerable."""
    def shape_repeats(crowded: bool) -> float:
        repeats = []
        for index in range(400):
            objects, rng = scene("train", index, (1, 4), crowded=crowded)
            assert len({(o.colour, o.shape) for o in objects}) == len(objects) <= 4
            question, answer = ask(objects, "colour", rng)
            assert answer_from_scene(question, objects) == answer
            repeats.append(sum(o.shape == question.split()[4] for o in objects) > 1)
        return float(np.mean(repeats))

    assert shape_repeats(crowded=True) > shape_repeats(crowded=False) + 0.15
    assert scene("test", 5, crowded=False)[0] == example("test", 5).objects  # the benchmark is untouched


def test_caption_lists_every_object_by_colour_then_shape():
    ex = example("test", 11)
    entries = caption(ex.objects).rstrip(" .").split(" , ")
    assert sorted(entries) == sorted(f"{o.colour} {o.shape} {o.region}" for o in ex.objects)
    rank = [(list(COLOURS).index(e.split()[0]), SHAPES.index(e.split()[1])) for e in entries]
    assert rank == sorted(rank)


def test_module_cli_writes_a_zspa_eval_data_file(tmp_path):
    from zspa.evaluation import read_dataset

    done = subprocess.run([sys.executable, "-m", "zspa.datasets.needles", "--split", "test", "--count", "6",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    items, problems = read_dataset(tmp_path / "test.jsonl")
    assert not problems and len(items) == 6 and all(image.is_file() for i in items for image in i.images)
    first = json.loads((tmp_path / "test.jsonl").read_text().splitlines()[0])
    assert (first["question"], first["answer"], first["kind"]) == (example("test", 0).question,
                                                                     example("test", 0).answer, "colour")
    bad = subprocess.run([sys.executable, "-m", "zspa.datasets.needles", "--count", "0", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--count must be at least 1" in bad.stderr


@pytest.mark.slow
def test_needles_llava_answers_through_the_runtime_as_in_transformers(tmp_path):
    """The shipped weights, exported and run unpruned by the runtime, pick the same first answer
    token as transformers on the same weights for held-out questions."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from zspa.export.exporter import ExportOptions, export_bundle
    from zspa.runtime.pipeline import Pipeline

    export_bundle(ExportOptions("needles-llava", tmp_path / "b", keeps=[0.1], progress=False))
    pipeline = Pipeline.load(tmp_path / "b")
    model = LlavaForConditionalGeneration.from_pretrained(NEEDLES_MODEL_DIR, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(NEEDLES_MODEL_DIR)
    for index in range(12):
        ex = example("test", index)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ex.question}]}]
        inputs = processor(images=[image_for("test", index)], return_tensors="pt",
                           text=[processor.apply_chat_template(messages, add_generation_prompt=True)])
        with torch.no_grad():
            expected = int(model(**inputs).logits[0, -1].argmax())
        ours = pipeline.generate(image_for("test", index), ex.question, keep=1.0, max_new_tokens=1)
        assert ours.token_ids[0] == expected, ex.question


@pytest.mark.slow
def test_cdpruner_keeps_distinct_tokens_on_a_mostly_flat_image(tmp_path):
    """Test image 290 is mostly background: after a few picks CDPruner's DPP kernel has no new
    direction left. The graph used to divide by the vanishing residual variance, reach NaN and
    gather an out-of-range token (found by pruning_quality.py); a spent direction now updates nothing."""
    from zspa.export.exporter import ExportOptions, export_bundle
    from zspa.runtime.pipeline import Pipeline

    export_bundle(ExportOptions("needles-llava", tmp_path / "b", keeps=[0.5], methods=["cdpruner"], progress=False))
    pipeline = Pipeline.load(tmp_path / "b")
    ex = example("test", 290)
    for keep, k in ((0.5, 128), (0.25, 64)):
        kept = pipeline.generate(image_for("test", 290), ex.question, keep=keep, method="cdpruner",
                                 max_new_tokens=1).kept_indices
        assert len(kept) == len(set(kept.tolist())) == k and kept.max() < 256
