"""InternVL3 against transformers on the same weights (issue 23): the tile grid and preprocessing
(`GotOcr2ImageProcessorPil`, as InternVLProcessor calls it), the vision graph over an image's
tiles, prompt ids with `<img>…</img>`, keep 1.0 = `generate` at 1, 3 and 13 tiles, pruned answers =
a PyTorch reference on the same kept indices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from zspa.pruning import METHOD_DEFAULTS
from zspa.pruning.budget import token_budget
from zspa.runtime.positions import prefill_positions
from zspa.runtime.tiles import tile_grid
from zspa.runtime.vision_kinds import prepare_vision

from references import greedy_continue
from torch_pruners import PrunerGraph, ZSPASelector

QUESTION = "What is the man wearing on his head?"
MAX_NEW = 10
# (width, height) → 1 tile, 2 tiles and a thumbnail, the photo as shipped (12 + thumbnail), strips, tiny.
SIZES = [(448, 448), (896, 448), (512, 600), (1600, 300), (40, 800), (28, 28), (2000, 1000)]
GENERATE_SIZES = [(448, 448), (896, 448), (512, 600)]  # 1, 3 and 13 tiles


@pytest.fixture(scope="module")
def photo(photo_path):
    return Image.open(photo_path).convert("RGB")


def _hf_inputs(processor, images):
    """The tiles as InternVLProcessor asks for them (its call defaults set crop_to_patches)."""
    return processor.image_processor(images=images, crop_to_patches=True, return_tensors="pt")


@pytest.mark.parametrize("max_tiles", [1, 6, 12])
def test_tile_grid_matches_transformers(max_tiles):
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    rng = np.random.default_rng(max_tiles)
    for height, width in [*rng.integers(1, 5000, size=(300, 2)).tolist(), (448, 448), (448, 896), (100, 10)]:
        assert tile_grid(height, width, (448, 448), 1, max_tiles) == get_optimal_tiled_canvas(
            (height, width), (448, 448), 1, max_tiles)


@pytest.mark.parametrize("size", SIZES)
def test_preprocessing_matches_transformers(internvl_hf, internvl_pipeline, photo, size):
    image = photo.resize(size)
    expected = _hf_inputs(internvl_hf[1], [image])
    ours = prepare_vision(image, internvl_pipeline.bundle.manifest.vision)
    assert ours.grid == (int(expected["num_patches"][0]), 16, 16)
    np.testing.assert_allclose(ours.feeds["pixel_values"], expected["pixel_values"].numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", GENERATE_SIZES)
def test_vision_graph_matches_transformers(internvl_hf, internvl_pipeline, photo, size):
    model, processor = internvl_hf
    inputs = _hf_inputs(processor, [photo.resize(size)])
    with torch.no_grad():
        expected = model.model.get_image_features(inputs["pixel_values"], vision_feature_layer=-1,
                                                  vision_feature_select_strategy="default").pooler_output
    (ours,) = internvl_pipeline.vision.run({"pixel_values": inputs["pixel_values"].numpy()})
    assert ours.shape == (1, expected.shape[0] * 256, expected.shape[-1])
    np.testing.assert_allclose(ours[0], expected.reshape(-1, expected.shape[-1]).numpy(),
                               atol=1e-4 * float(expected.abs().max()), rtol=0)


def _hf_ids(internvl_hf, prompt, tiles: list[int]) -> torch.Tensor:
    """The prompt's ids as InternVLProcessor writes them: each `<IMG_CONTEXT>` expanded to 256 per tile."""
    model = internvl_hf[0]
    pieces, previous = [], 0
    for at, count in zip(prompt.image_positions, tiles):
        pieces += [prompt.input_ids[previous:at], np.full(256 * count, model.config.image_token_id)]
        previous = at + 1
    return torch.from_numpy(np.concatenate([*pieces, prompt.input_ids[previous:]]))[None]


def test_prompt_wraps_each_image_as_the_processor_does(internvl_hf, internvl_pipeline):
    """`<img><IMG_CONTEXT></img>` per image, tokenized as transformers tokenizes the expanded text."""
    _, processor = internvl_hf
    prompt = internvl_pipeline.prompts.build(QUESTION, images=2)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": QUESTION}]}]
    rendered = processor.tokenizer.apply_chat_template(messages, chat_template=processor.chat_template,
                                                       add_generation_prompt=True, tokenize=False)
    expanded = rendered.replace("<IMG_CONTEXT>", "<img>" + "<IMG_CONTEXT>" * 256 + "</img>")
    assert _hf_ids(internvl_hf, prompt, [1, 1])[0].tolist() == processor.tokenizer(expanded)["input_ids"]
    marked = internvl_pipeline.prompts.decode(prompt.input_ids[prompt.question_mask == 1].tolist())
    assert marked.strip() == QUESTION


def _generate(model, ids, pixel_values) -> list[int]:
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values,
                             max_new_tokens=MAX_NEW, do_sample=False)
    return [t for t in out[0, ids.shape[1]:].tolist() if t not in model.generation_config.eos_token_id]


@pytest.mark.parametrize("size", GENERATE_SIZES)
def test_keep_one_reproduces_hf_generate(internvl_hf, internvl_pipeline, photo, size):
    model, processor = internvl_hf
    image = photo.resize(size)
    inputs = _hf_inputs(processor, [image])
    ids = _hf_ids(internvl_hf, internvl_pipeline.prompts.build(QUESTION), inputs["num_patches"].tolist())
    expected = _generate(model, ids, inputs["pixel_values"])
    result = internvl_pipeline.generate(image, QUESTION, keep=1.0, max_new_tokens=MAX_NEW)
    assert result.token_ids == expected and len(set(expected)) >= 3
    assert result.stats.visual_tokens_total == (ids == model.config.image_token_id).sum()


def test_two_images_at_keep_one_reproduce_hf_generate(internvl_hf, internvl_pipeline, photo):
    model, processor = internvl_hf
    images = [photo.resize((896, 448)), photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((448, 448))]
    inputs = _hf_inputs(processor, images)
    ids = _hf_ids(internvl_hf, internvl_pipeline.prompts.build(QUESTION, images=2), inputs["num_patches"].tolist())
    result = internvl_pipeline.generate(images, QUESTION, keep=1.0, max_new_tokens=MAX_NEW)
    assert result.token_ids == _generate(model, ids, inputs["pixel_values"])
    assert result.stats.visual_tokens_total == 4 * 256


@torch.no_grad()
def torch_reference(internvl_hf, pipeline, image, keep, scheme):
    """InternVL in PyTorch, pruned before the decoder with the eager ZSPAPrune module over all of the
    image's tiles, decoded greedily; 'original' positions are the kept tokens' columns of the
    unpruned sequence. Shares only the eager pruner with the exporter."""
    from transformers import DynamicCache

    model, processor = internvl_hf
    inputs = _hf_inputs(processor, [image])
    prompt = pipeline.prompts.build(QUESTION)
    features = model.model.get_image_features(inputs["pixel_values"], vision_feature_layer=-1,
                                              vision_feature_select_strategy="default").pooler_output
    features = features.reshape(1, -1, features.shape[-1])
    n = features.shape[1]
    embed = model.get_input_embeddings()
    text_embeds = embed(torch.from_numpy(prompt.input_ids)[None])
    selector = ZSPASelector(**METHOD_DEFAULTS["zspa"])
    kept, kept_idx = PrunerGraph(selector, token_budget(keep, n))(features, text_embeds,
                                                                  torch.from_numpy(prompt.question_mask)[None])
    (at,) = prompt.image_positions
    sequence = torch.cat([text_embeds[:, :at], kept, text_embeds[:, at + 1:]], dim=1)
    if scheme == "original":
        after = len(prompt.input_ids) - at - 1
        positions = torch.cat([torch.arange(at), at + kept_idx[0], torch.arange(at + n, at + n + after)])[None]
    else:
        positions = torch.arange(sequence.shape[1])[None]
    lm = model.model.language_model
    out = lm(inputs_embeds=sequence, position_ids=positions, cache=DynamicCache(), use_cache=True)
    tokens = greedy_continue(lm, model.lm_head, embed, out, model.generation_config.eos_token_id,
                             int(positions.max()) + 1, (1, 1), MAX_NEW)
    return kept_idx[0].numpy(), tokens


@pytest.mark.parametrize("keep", [0.1, 0.25])
@pytest.mark.parametrize("scheme", ["original", "contiguous"])
def test_pruned_chain_reproduces_torch_reference(internvl_hf, internvl_bundle, photo, keep, scheme):
    from zspa.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(internvl_bundle, positions=scheme)
    image = photo.resize((896, 448))
    result = pipeline.generate(image, QUESTION, keep=keep, max_new_tokens=MAX_NEW)
    expected_idx, expected_tokens = torch_reference(internvl_hf, pipeline, image, keep, scheme)
    np.testing.assert_array_equal(result.kept_indices, expected_idx)
    assert result.token_ids == expected_tokens
    assert result.stats.visual_tokens_kept == token_budget(keep, 3 * 256)


def test_original_positions_are_the_unpruned_columns(internvl_pipeline, photo):
    """1-D 'original' positions over a tiled block: the kept tokens' indices in the expanded prompt."""
    prompt = internvl_pipeline.prompts.build(QUESTION)
    grid = prepare_vision(photo, internvl_pipeline.bundle.manifest.vision).grid
    kept = np.array([0, 255, 256, 3000, 3327])
    (at,) = prompt.image_positions
    ours = prefill_positions(prompt.text_runs, [kept], [grid], "original")
    n = int(np.prod(grid))
    expected = np.r_[np.arange(at), at + kept, at + n + np.arange(len(prompt.input_ids) - at - 1)]
    np.testing.assert_array_equal(ours, expected)


def test_max_tiles_at_export_bounds_the_tokens_as_the_processor_would(internvl_hf, photo, tmp_path):
    """--max-tiles 4: the bundle's most tokens per image (4 tiles and the thumbnail) and its tiling
    follow, as `GotOcr2ImageProcessorPil(max_patches=4)` tiles; a model without tiles refuses it."""
    from transformers import GotOcr2ImageProcessorPil

    from zspa.errors import InvalidInputError
    from zspa.export.exporter import ExportOptions, export_bundle
    from zspa.runtime.pipeline import Pipeline

    report = export_bundle(ExportOptions("tiny-random-internvl3", tmp_path / "small", keeps=[0.25], max_tiles=4,
                                         progress=False))
    assert (report.manifest.vision.max_tiles, report.manifest.vision.num_tokens) == (4, 5 * 256)
    processor = internvl_hf[1].image_processor
    reference = GotOcr2ImageProcessorPil(**{**processor.to_dict(), "max_patches": 4})
    image = photo.resize((1344, 896))  # 3 × 2 tiles and a thumbnail at 12 tiles at most; 2 × 2 and one at 4
    expected = reference(images=[image], crop_to_patches=True, return_tensors="pt")
    result = Pipeline.load(tmp_path / "small").generate(image, QUESTION, keep=1.0, max_new_tokens=2)
    assert result.stats.visual_tokens_total == 256 * int(expected["num_patches"][0]) == 5 * 256
    with pytest.raises(InvalidInputError, match="tiled models"):
        export_bundle(ExportOptions("tiny-random-llava", tmp_path / "llava", max_tiles=4, progress=False))
