"""Qwen2.5-VL, Qwen2-VL and Qwen3-VL against transformers on the same weights (issues 11, 22):
preprocessing, the vision graph's index inputs, M-RoPE positions, keep 1.0 = `generate`, pruned
answers = a PyTorch reference (with DeepStack on Qwen3-VL). Tests that take `qwen_family` run on
each family's tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from zspa.pruning import METHOD_DEFAULTS
from zspa.pruning.budget import token_budget
from zspa.runtime.images import load_image
from zspa.runtime.positions import prefill_positions
from zspa.runtime.qwen_vision import position_taps, rotary_positions, window_order, window_slots
from zspa.runtime.vision_kinds import prepare_vision

from references import greedy_continue
from torch_pruners import PrunerGraph, ZSPASelector

QUESTION = "What is the man wearing on his head?"
MAX_NEW = 10
# (width, height): the photo as shipped, wide, tall, tiny, 1:20 strips, and above max_pixels.
SIZES = [(512, 600), (896, 672), (300, 500), (28, 28), (40, 800), (800, 40), (1600, 1300)]


@pytest.fixture(scope="module")
def photo(photo_path):
    return Image.open(photo_path).convert("RGB")


def _hf_inputs(processor, image):
    return processor.image_processor(images=[image], return_tensors="pt")


@pytest.mark.parametrize("prefix", ["qwen", "qwen3"])  # 14 px patches; Qwen3-VL's 16 px, mean and std 0.5
@pytest.mark.parametrize("size", SIZES)
def test_preprocessing_matches_transformers(prefix, photo, size, request):
    _, processor = request.getfixturevalue(f"{prefix}_hf")
    image = photo.resize(size)
    expected = _hf_inputs(processor, image)
    ours = prepare_vision(image, request.getfixturevalue(f"{prefix}_pipeline").bundle.manifest.vision)
    assert list(ours.grid) == [1, *(expected["image_grid_thw"][0, 1:] // 2).tolist()]
    np.testing.assert_allclose(ours.feeds["pixel_values"], expected["pixel_values"].numpy(), atol=1e-5, rtol=0)


def test_preprocessing_refuses_extreme_aspect_ratios(qwen_pipeline):
    from zspa.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="aspect ratio"):
        prepare_vision(Image.new("RGB", (4020, 20)), qwen_pipeline.bundle.manifest.vision)


@pytest.mark.parametrize("grid", [(4, 4), (8, 12), (16, 20), (26, 46), (2, 58)])
def test_vision_indices_match_transformers(grid):
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    thw = torch.tensor([[1, *grid]])
    expected_positions = get_vision_position_ids(thw, 2)
    expected_order, expected_bounds = get_vision_window_index(thw, spatial_merge_size=2, window_size=112, patch_size=14)
    np.testing.assert_array_equal(rotary_positions(*grid, 2), expected_positions.numpy())
    order, bounds = window_order(*grid, 2, 112, 14)
    np.testing.assert_array_equal(order, expected_order.numpy())
    np.testing.assert_array_equal(bounds, expected_bounds.numpy())
    # The batched-window layout holds exactly transformers' windows, and `positions` inverts it.
    slots, positions = window_slots(bounds, 64)
    for window, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        np.testing.assert_array_equal(slots[window][slots[window] >= 0], np.arange(start, end))
    np.testing.assert_array_equal(slots.ravel()[positions], np.arange(bounds[-1]))


@pytest.mark.parametrize("grid", [(4, 4), (8, 12), (16, 20), (26, 46), (2, 58), (2, 2)])
@pytest.mark.parametrize("side", [8, 48])
def test_position_table_taps_match_transformers(grid, side):
    """Qwen3-VL's learned position table resampled to the grid: the same taps, bit-identical weights."""
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    expected_indices, expected_weights = get_vision_interpolation_indices_and_weights(
        torch.tensor([[1, *grid]]), num_grid_per_side=side, mode="bilinear", align_corners=True, spatial_merge_size=2)
    indices, weights = position_taps(*grid, 2, side)
    np.testing.assert_array_equal(indices, expected_indices.numpy())
    np.testing.assert_array_equal(weights, expected_weights.numpy())


@pytest.mark.parametrize("size", [(512, 600), (896, 672), (40, 800)])
def test_vision_graph_matches_transformers(qwen_family, photo, size):
    qwen_hf, _, qwen_pipeline = qwen_family[1:]
    model, processor = qwen_hf
    image = photo.resize(size)
    inputs = _hf_inputs(processor, image)
    expected = hf_image_features(model, inputs)
    ours = qwen_pipeline.vision.run(prepare_vision(image, qwen_pipeline.bundle.manifest.vision).feeds)
    assert len(ours) == len(expected) == 1 + qwen_pipeline.bundle.manifest.decoder.deepstack_layers
    for mine, theirs in zip(ours, expected):  # image_features, then each DeepStack plane
        assert mine.shape == (1, *theirs.shape)
        np.testing.assert_allclose(mine[0], theirs.numpy(), atol=1e-4 * float(theirs.abs().max()), rtol=0)


@torch.no_grad()
def hf_image_features(model, inputs) -> list[torch.Tensor]:
    """transformers' image features [N, D] of one image, then its DeepStack planes (Qwen3-VL)."""
    output = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    planes = getattr(output, "deepstack_features", None) or []  # per plane, split by image
    return [output.pooler_output[0], *(plane[0] for plane in planes)]


def _hf_sequence(qwen_hf, pipeline, photo_path, size):
    """input_ids with the image slot expanded to N tokens (as the processor would), and the image inputs."""
    model, processor = qwen_hf
    image = load_image(photo_path).resize(size)
    prompt = pipeline.prompts.build(QUESTION)
    inputs = _hf_inputs(processor, image)
    n = int(inputs["image_grid_thw"].prod()) // 4
    (at,) = prompt.image_positions
    ids = np.concatenate([prompt.input_ids[:at], np.full(n, model.config.image_token_id), prompt.input_ids[at + 1 :]])
    return torch.from_numpy(ids)[None], inputs, image, prompt


@pytest.mark.parametrize("size", [(512, 600), (896, 672), (300, 500)])
def test_mrope_positions_match_get_rope_index(qwen_family, photo_path, size):
    qwen_hf, _, qwen_pipeline = qwen_family[1:]
    hf = qwen_hf[0]
    ids, inputs, image, prompt = _hf_sequence(qwen_hf, qwen_pipeline, photo_path, size)
    expected, _ = hf.model.get_rope_index(ids, mm_token_type_ids=(ids == hf.config.image_token_id).int(),
                                          image_grid_thw=inputs["image_grid_thw"])
    grid = prepare_vision(image, qwen_pipeline.bundle.manifest.vision).grid
    n = grid[1] * grid[2]
    ours = prefill_positions(prompt.text_runs, [np.arange(n)], [grid], "original", mrope=True)
    np.testing.assert_array_equal(ours, expected[:, 0].numpy())


@pytest.mark.parametrize("size", [(512, 600), (896, 672), (300, 500)])
def test_keep_one_reproduces_hf_generate(qwen_family, photo_path, size):
    qwen_hf, _, qwen_pipeline = qwen_family[1:]
    hf = qwen_hf[0]
    ids, inputs, image, _ = _hf_sequence(qwen_hf, qwen_pipeline, photo_path, size)
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
                          image_grid_thw=inputs["image_grid_thw"], max_new_tokens=MAX_NEW, do_sample=False,
                          mm_token_type_ids=(ids == hf.config.image_token_id).int())
    expected = [t for t in out[0, ids.shape[1]:].tolist() if t not in hf.generation_config.eos_token_id]
    result = qwen_pipeline.generate(image, QUESTION, keep=1.0, max_new_tokens=MAX_NEW)
    assert result.token_ids == expected
    assert result.stats.visual_tokens_total == (ids == hf.config.image_token_id).sum()


@torch.no_grad()
def torch_reference(qwen_hf, pipeline, photo_path, keep, scheme):
    """A Qwen-VL in PyTorch, pruned before the decoder with the eager ZSPAPrune module and decoded
    greedily; positions from transformers' `get_rope_index` on the unpruned sequence (original:
    the kept tokens' columns; contiguous: 0..S-1); Qwen3-VL's DeepStack planes at the same kept
    indices. Shares only the eager pruner with the exporter."""
    from transformers import DynamicCache

    model = qwen_hf[0]
    ids, inputs, _, prompt = _hf_sequence(qwen_hf, pipeline, photo_path, (512, 600))
    image_id = model.config.image_token_id
    features, *planes = hf_image_features(model, inputs)
    features = features[None]
    n = features.shape[1]
    embed = model.get_input_embeddings()
    text_embeds = embed(torch.from_numpy(prompt.input_ids)[None])
    k = token_budget(keep, n)
    selector = ZSPASelector(**METHOD_DEFAULTS["zspa"])
    kept, kept_idx = PrunerGraph(selector, k)(features, text_embeds, torch.from_numpy(prompt.question_mask)[None])
    (at,) = prompt.image_positions
    sequence = torch.cat([text_embeds[:, :at], kept, text_embeds[:, at + 1:]], dim=1)
    full, _ = model.model.get_rope_index(ids, mm_token_type_ids=(ids == image_id).int(),
                                         image_grid_thw=inputs["image_grid_thw"])
    if scheme == "original":
        columns = torch.cat([torch.arange(at), at + kept_idx[0], torch.arange(at + n, ids.shape[1])])
        positions = full[:, :, columns]
    else:
        positions = torch.arange(sequence.shape[1]).view(1, 1, -1).expand(3, 1, -1)
    lm = model.model.language_model
    deepstack = {}
    if planes:  # DeepStack: the kept tokens' planes at their positions, through transformers' own mask
        visual = torch.zeros(sequence.shape[:2], dtype=torch.bool)
        visual[:, at : at + k] = True
        deepstack = {"visual_pos_masks": visual, "deepstack_visual_embeds": [p[kept_idx[0]] for p in planes]}
    out = lm(inputs_embeds=sequence, position_ids=positions, cache=DynamicCache(), use_cache=True, **deepstack)
    tokens = greedy_continue(lm, model.lm_head, embed, out, model.generation_config.eos_token_id,
                             int(positions.max()) + 1, (3, 1, 1), MAX_NEW)
    return kept_idx[0].numpy(), tokens


@pytest.mark.parametrize("keep", [0.1, 0.25])
@pytest.mark.parametrize("scheme", ["original", "contiguous"])
def test_pruned_chain_reproduces_torch_reference(qwen_family, photo_path, keep, scheme):
    from zspa.runtime.pipeline import Pipeline

    qwen_hf, qwen_bundle, _ = qwen_family[1:]
    pipeline = Pipeline.load(qwen_bundle, positions=scheme)
    image = load_image(photo_path).resize((512, 600))
    result = pipeline.generate(image, QUESTION, keep=keep, max_new_tokens=MAX_NEW)
    expected_idx, expected_tokens = torch_reference(qwen_hf, pipeline, photo_path, keep, scheme)
    np.testing.assert_array_equal(result.kept_indices, expected_idx)
    assert result.token_ids == expected_tokens
    assert result.stats.visual_tokens_kept == len(expected_idx) == token_budget(keep, result.stats.visual_tokens_total)


def test_any_keep_runs_without_re_export(qwen_family, photo_path):
    """0.37 was never exported: the per-request pruner takes K from the image's own N."""
    qwen_pipeline = qwen_family[3]
    for size in [(512, 600), (896, 672)]:
        image = load_image(photo_path).resize(size)
        result = qwen_pipeline.generate(image, QUESTION, keep=0.37, max_new_tokens=2)
        n = result.stats.visual_tokens_total
        assert result.stats.visual_tokens_kept == token_budget(0.37, n) < n


def test_qwen2_vl_graph_takes_patches_and_positions_only_and_answers_vary(qwen2_pipeline, photo_path):
    """No attention windows in Qwen2-VL's tower: its graph has no window inputs, and the runtime feeds
    none; the tiny model's greedy answer is not one token repeated (the parity tests would prove little)."""
    manifest = qwen2_pipeline.bundle.manifest
    assert [t.name for t in manifest.graphs["vision"].inputs] == ["pixel_values", "vision_position_ids"]
    assert manifest.family == "qwen2_vl" and manifest.vision.window_size == 0 and manifest.decoder.mrope
    result = qwen2_pipeline.generate(load_image(photo_path), QUESTION, keep=1.0, max_new_tokens=MAX_NEW)
    assert len(set(result.token_ids)) >= 4


def test_qwen3_vl_deepstack_reaches_the_decoder_and_answers_vary(qwen3_hf, qwen3_pipeline, photo_path):
    """The graphs carry DeepStack: the vision graph takes the position table's taps and gives a
    plane per DeepStack block, the decoder takes them; dropping them moves the logits (so the
    parity tests above could tell), and the tiny model's greedy answer is not one token repeated."""
    manifest = qwen3_pipeline.bundle.manifest
    assert [t.name for t in manifest.graphs["vision"].inputs] == [
        "pixel_values", "vision_position_ids", "position_embed_indices", "position_embed_weights"]
    planes = len(qwen3_hf[0].config.vision_config.deepstack_visual_indexes)
    assert manifest.decoder.deepstack_layers == planes == len(manifest.graphs["vision"].outputs) - 1
    assert "deepstack_embeds" in [t.name for t in manifest.graphs["decoder"].inputs]
    image = load_image(photo_path)
    result = qwen3_pipeline.generate(image, QUESTION, keep=1.0, max_new_tokens=MAX_NEW)
    assert len(set(result.token_ids)) >= 4
    decoder = qwen3_pipeline.decoder
    real = result.first_token_logits
    original_step = decoder.step
    decoder.step = lambda embeds, mask, positions, deepstack=None: original_step(embeds, mask, positions)
    try:
        dropped = qwen3_pipeline.generate(image, QUESTION, keep=1.0, max_new_tokens=1).first_token_logits
    finally:
        decoder.step = original_step
    assert float(np.abs(real - dropped).max()) > 0.01 * float(np.abs(real).max())


def _two_images(qwen_hf, pipeline, photo, question="Which picture is brighter?"):
    """A prompt with two images of different sizes, its ids with each slot expanded as the processor
    would, and the image processor's inputs for both."""
    model, processor = qwen_hf
    images = [photo.resize((512, 600)), photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((300, 500))]
    prompt = pipeline.prompts.build(question, images=2)
    inputs = processor.image_processor(images=images, return_tensors="pt")
    counts = (inputs["image_grid_thw"].prod(-1) // 4).tolist()
    pieces, previous = [], 0
    for at, count in zip(prompt.image_positions, counts):
        pieces += [prompt.input_ids[previous:at], np.full(count, model.config.image_token_id)]
        previous = at + 1
    ids = torch.from_numpy(np.concatenate([*pieces, prompt.input_ids[previous:]]))[None]
    return images, prompt, ids, inputs


def test_two_image_positions_match_get_rope_index(qwen_family, photo):
    """Each image block starts after the previous block's largest position, as `get_rope_index`."""
    qwen_hf, _, qwen_pipeline = qwen_family[1:]
    hf = qwen_hf[0]
    images, prompt, ids, inputs = _two_images(qwen_hf, qwen_pipeline, photo)
    expected, _ = hf.model.get_rope_index(ids, mm_token_type_ids=(ids == hf.config.image_token_id).int(),
                                          image_grid_thw=inputs["image_grid_thw"])
    grids = [prepare_vision(image, qwen_pipeline.bundle.manifest.vision).grid for image in images]
    ours = prefill_positions(prompt.text_runs, [np.arange(np.prod(grid)) for grid in grids], grids, "original",
                             mrope=True)
    np.testing.assert_array_equal(ours, expected[:, 0].numpy())


def test_two_images_at_keep_one_reproduce_hf_generate(qwen_family, photo):
    qwen_hf, _, qwen_pipeline = qwen_family[1:]
    hf = qwen_hf[0]
    images, _, ids, inputs = _two_images(qwen_hf, qwen_pipeline, photo)
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
                          image_grid_thw=inputs["image_grid_thw"], max_new_tokens=MAX_NEW, do_sample=False,
                          mm_token_type_ids=(ids == hf.config.image_token_id).int())
    expected = [t for t in out[0, ids.shape[1]:].tolist() if t not in hf.generation_config.eos_token_id]
    result = qwen_pipeline.generate(images, "Which picture is brighter?", keep=1.0, max_new_tokens=MAX_NEW)
    assert result.token_ids == expected and len(set(expected)) >= 3
    assert result.stats.visual_tokens_total == (ids == hf.config.image_token_id).sum()


@pytest.mark.parametrize("keep", [0.1, 0.25])
def test_each_image_is_pruned_on_its_own_budget(qwen_pipeline, photo, keep):
    """K_i = max(1, round(keep · N_i)) per image, and each image keeps the tokens it keeps alone:
    the pruner scores against the question, whatever else the prompt holds."""
    images = [photo.resize((512, 600)), photo.resize((300, 500))]
    both = qwen_pipeline.generate(images, QUESTION, keep=keep, max_new_tokens=1)
    alone = [qwen_pipeline.generate(image, QUESTION, keep=keep, max_new_tokens=1) for image in images]
    assert both.stats.visual_tokens_total == sum(a.stats.visual_tokens_total for a in alone)
    assert both.stats.visual_tokens_kept == sum(token_budget(keep, a.stats.visual_tokens_total) for a in alone)
    first = alone[0].stats.visual_tokens_total
    np.testing.assert_array_equal(both.kept_indices, np.concatenate([alone[0].kept_indices,
                                                                     first + alone[1].kept_indices]))


@pytest.mark.parametrize("mrope", [True, False])
def test_pruned_blocks_keep_their_unpruned_positions(qwen_hf, qwen_pipeline, photo, mrope):
    """Under 'original', every kept token of every block sits where it sat unpruned (M-RoPE:
    `get_rope_index`'s column; 1-D: its index in the expanded sequence), text runs too."""
    hf = qwen_hf[0]
    images, prompt, ids, inputs = _two_images(qwen_hf, qwen_pipeline, photo)
    grids = [prepare_vision(image, qwen_pipeline.bundle.manifest.vision).grid for image in images]
    rng = np.random.default_rng(0)
    kept = [np.sort(rng.choice(int(np.prod(g)), size=5, replace=False)) for g in grids]
    image = (ids[0] == hf.config.image_token_id).numpy()
    block_starts = np.flatnonzero(image & ~np.r_[False, image[:-1]])
    columns = np.flatnonzero(~image).tolist() + [int(s + k) for s, block in zip(block_starts, kept) for k in block]
    columns.sort()
    if mrope:
        full = hf.model.get_rope_index(ids, mm_token_type_ids=torch.from_numpy(image).int()[None],
                                       image_grid_thw=inputs["image_grid_thw"])[0][:, 0].numpy()
    else:
        full = np.arange(ids.shape[1])
    ours = prefill_positions(prompt.text_runs, kept, grids, "original", mrope=mrope)
    np.testing.assert_array_equal(ours, full[..., columns])
