"""Gemma 3 against transformers on the same weights (issue 23): pan&scan crops and preprocessing
(`Gemma3ImageProcessorPil`), prompt ids as `Gemma3Processor` writes them, keep 1.0 = `generate`
with and without pan&scan, the bidirectional image blocks (a causal-only decoder differs), and
pruned answers = a PyTorch reference on the same kept indices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from zspa.pruning import METHOD_DEFAULTS
from zspa.pruning.budget import token_budget
from zspa.runtime.views import crop_boxes, prepare_views

from references import greedy_continue
from torch_pruners import PrunerGraph, ZSPASelector

QUESTION = "What is the man wearing on his head?"
MAX_NEW = 10
TOKENS = 64  # tiny-random-gemma3's tokens per view
# (width, height): the photo as shipped (no crops), wide (2 crops), 16:9 (2), tall (3), too thin to crop.
SIZES = [(512, 600), (900, 400), (1280, 720), (400, 1300), (700, 250)]


@pytest.fixture(scope="module")
def photo(photo_path):
    return Image.open(photo_path).convert("RGB")


@pytest.fixture(scope="module")
def plain_pipeline(tmp_path_factory):
    """tiny-random-gemma3 as the released checkpoints are set: pan&scan off."""
    from zspa.export.exporter import ExportOptions, export_bundle
    from zspa.runtime.pipeline import Pipeline

    out = tmp_path_factory.mktemp("bundles") / "gemma3-plain"
    export_bundle(ExportOptions("tiny-random-gemma3", out, keeps=[0.1], progress=False))
    return Pipeline.load(out)


def _hf_inputs(processor, text: str, images: list, pan_and_scan: bool):
    """Gemma3Processor's inputs; its call defaults switch pan&scan off unless asked."""
    return processor(text=text, images=images, do_pan_and_scan=pan_and_scan, return_tensors="pt")


def _rendered(processor, images: int) -> str:
    content = [*({"type": "image"} for _ in range(images)), {"type": "text", "text": QUESTION}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def test_crop_boxes_match_transformers_pan_and_scan(gemma3_hf, gemma3_pipeline):
    image_processor = gemma3_hf[1].image_processor
    spec = gemma3_pipeline.bundle.manifest.vision
    rng = np.random.default_rng(0)
    sizes = [*rng.integers(1, 1600, size=(200, 2)).tolist(), (1200, 1000), (300, 256), (1024, 256), (255, 700)]
    for width, height in sizes:
        pixels = (np.arange(height)[:, None] * 10_000 + np.arange(width))[None]
        expected = image_processor.pan_and_scan(pixels, spec.min_crop_size, spec.max_crops, spec.min_ratio)
        ours = [pixels[:, top:bottom, left:right] for left, top, right, bottom in crop_boxes(width, height, spec)]
        assert len(ours) == len(expected), (width, height)
        for mine, theirs in zip(ours, expected):
            np.testing.assert_array_equal(mine, theirs)


@pytest.mark.parametrize("size", SIZES)
def test_views_match_the_processor(gemma3_hf, gemma3_pipeline, photo, size):
    image = photo.resize(size)
    expected = _hf_inputs(gemma3_hf[1], _rendered(gemma3_hf[1], 1), [image], pan_and_scan=True)
    ours = prepare_views(image, gemma3_pipeline.bundle.manifest.vision)
    np.testing.assert_array_equal(ours.feeds["pixel_values"], expected["pixel_values"].numpy())
    assert ours.views == (expected["input_ids"] == gemma3_hf[0].config.boi_token_id).sum()
    assert ours.num_tokens == (expected["input_ids"] == gemma3_hf[0].config.image_token_id).sum()


def _expanded_ids(prompt, image_token_id: int) -> list[int]:
    """The prompt's ids with each block's placeholder as the processor's 64 soft tokens."""
    ids = []
    for token in prompt.input_ids.tolist():
        ids += [token] * TOKENS if token == image_token_id else [token]
    return ids


@pytest.mark.parametrize("sizes", [[(512, 600)], [(1280, 720)], [(400, 1300), (900, 400)]])
def test_prompt_ids_are_the_processor_s(gemma3_hf, gemma3_pipeline, photo, sizes):
    """BOS from the template, "\\n\\n<start_of_image>…<end_of_image>\\n\\n" per view, pan&scan's text
    around an image's crops, for one image and two; the question marked."""
    model, processor = gemma3_hf
    images = [photo.resize(size) for size in sizes]
    views = tuple(prepare_views(image, gemma3_pipeline.bundle.manifest.vision).views for image in images)
    prompt = gemma3_pipeline.prompts.build(QUESTION, images=len(images), views=views)
    expected = _hf_inputs(processor, _rendered(processor, len(images)), images, pan_and_scan=True)["input_ids"]
    assert _expanded_ids(prompt, model.config.image_token_id) == expected[0].tolist()
    marked = gemma3_pipeline.prompts.decode(prompt.input_ids[prompt.question_mask == 1].tolist())
    assert marked.strip() == QUESTION


def test_question_with_spaces_is_marked_though_the_template_trims_it(gemma3_pipeline):
    prompt = gemma3_pipeline.prompts.build(f"  {QUESTION}\n")
    marked = gemma3_pipeline.prompts.decode(prompt.input_ids[prompt.question_mask == 1].tolist())
    assert marked.strip() == QUESTION


def _generate(model, inputs) -> list[int]:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    return [t for t in out[0, inputs["input_ids"].shape[1]:].tolist() if t not in model.generation_config.eos_token_id]


@pytest.mark.parametrize("pan_and_scan", [True, False])
@pytest.mark.parametrize("size", [(512, 600), (1280, 720), (400, 1300)])
def test_keep_one_reproduces_hf_generate(gemma3_hf, gemma3_pipeline, plain_pipeline, photo, size, pan_and_scan):
    model, processor = gemma3_hf
    pipeline = gemma3_pipeline if pan_and_scan else plain_pipeline
    image = photo.resize(size)
    inputs = _hf_inputs(processor, _rendered(processor, 1), [image], pan_and_scan)
    expected = _generate(model, inputs)
    result = pipeline.generate(image, QUESTION, keep=1.0, max_new_tokens=MAX_NEW)
    assert result.token_ids == expected and len(set(expected)) >= 3
    assert result.stats.visual_tokens_total == (inputs["input_ids"] == model.config.image_token_id).sum()
    assert result.stats.prompt_tokens == inputs["input_ids"].shape[1]


def test_two_images_with_crops_reproduce_hf_generate(gemma3_hf, gemma3_pipeline, photo):
    model, processor = gemma3_hf
    images = [photo.resize((900, 400)), photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    inputs = _hf_inputs(processor, _rendered(processor, 2), images, pan_and_scan=True)
    result = gemma3_pipeline.generate(images, QUESTION, keep=1.0, max_new_tokens=MAX_NEW)
    assert result.token_ids == _generate(model, inputs)
    assert result.stats.visual_tokens_total == 4 * TOKENS


@pytest.mark.parametrize("keep", [1.0, 0.25])
def test_a_chunked_prefill_never_cuts_an_image_block(gemma3_pipeline, photo, keep):
    """Chunks end only between blocks (a block's queries see the whole block): fed 16 tokens at
    a time, the first logits equal a prefill in one piece, though a block is longer than 16."""
    pipeline = gemma3_pipeline
    request = pipeline.encode(pipeline.request(photo.resize((900, 400)), QUESTION, keep=keep, max_new_tokens=2))
    _, whole = pipeline.prefill(request)
    chunks = pipeline.start_prefill(request)
    fed = []
    while not chunks.done:
        fed.append(pipeline.prefill_chunk(chunks, 16))
    _, chunked = pipeline.finish_prefill(chunks)
    block_ids = chunks.extras["image_block_ids"][0]
    ends = np.cumsum(fed)
    assert all(e == len(block_ids) or block_ids[e] == 0 or block_ids[e] != block_ids[e - 1] for e in ends)
    longest = max(np.bincount(block_ids)[1:])
    assert longest > 16 and max(fed) >= longest  # the longest block went in one chunk, over the budget
    assert len(fed) > 3
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-4)


def test_a_causal_only_decoder_is_wrong_at_the_image_rows(gemma3_hf, gemma3_pipeline, photo):
    """transformers' `token_type_ids` mask opens each image block both ways; without it (a causal
    decoder, or image_block_ids all zero) the logits move, and ours follow the bidirectional ones."""
    model, processor = gemma3_hf
    inputs = _hf_inputs(processor, _rendered(processor, 1), [photo], pan_and_scan=False)
    with torch.no_grad():
        bidirectional = model(**inputs).logits[0, -1].numpy()
        causal = model(**{k: v for k, v in inputs.items() if k != "token_type_ids"}).logits[0, -1].numpy()
    pipeline = gemma3_pipeline
    request = pipeline.request(photo, QUESTION, keep=1.0)
    _, ours = pipeline.prefill(request)
    scale = float(np.abs(bidirectional).max())
    assert np.abs(ours - bidirectional).max() < 1e-4 * scale
    assert np.abs(causal - bidirectional).max() > 0.05 * scale


@torch.no_grad()
def torch_reference(gemma3_hf, pipeline, image, keep: float):
    """Gemma 3 in PyTorch, pruned before the decoder with the eager ZSPAPrune module over all of the
    image's views (one pool), each view's kept tokens spliced at its own block, marked as image
    tokens (`token_type_ids`) so transformers' mask makes each block bidirectional, 'original'
    positions, decoded greedily. Shares only the eager pruner with the exporter."""
    from transformers import DynamicCache

    model, processor = gemma3_hf
    views = prepare_views(image, pipeline.bundle.manifest.vision).views
    pixel_values = _hf_inputs(processor, _rendered(processor, 1), [image], pan_and_scan=True)["pixel_values"]
    prompt = pipeline.prompts.build(QUESTION, views=(views,))
    features = model.model.get_image_features(pixel_values).pooler_output
    features = features.reshape(1, -1, features.shape[-1])
    embed = model.get_input_embeddings()
    text_embeds = embed(torch.from_numpy(prompt.input_ids)[None])
    selector = ZSPASelector(**METHOD_DEFAULTS["zspa"])
    kept, kept_idx = PrunerGraph(selector, token_budget(keep, features.shape[1]))(
        features, text_embeds, torch.from_numpy(prompt.question_mask)[None])
    pieces, types, positions, previous, position = [], [], [], 0, 0
    for view, at in enumerate(prompt.image_positions):
        in_view = (kept_idx[0] >= view * TOKENS) & (kept_idx[0] < (view + 1) * TOKENS)
        pieces += [text_embeds[:, previous:at], kept[:, in_view]]
        types += [torch.zeros(at - previous, dtype=torch.long), torch.ones(int(in_view.sum()), dtype=torch.long)]
        positions += [position + torch.arange(at - previous), position + at - previous + kept_idx[0][in_view] % TOKENS]
        position += at - previous + TOKENS
        previous = at + 1
    tail = len(prompt.input_ids) - previous
    pieces.append(text_embeds[:, previous:])
    types.append(torch.zeros(tail, dtype=torch.long))
    positions.append(position + torch.arange(tail))
    positions = torch.cat(positions)[None]
    out = model.model(inputs_embeds=torch.cat(pieces, 1), token_type_ids=torch.cat(types)[None],
                      position_ids=positions, cache=DynamicCache(config=model.config.text_config), use_cache=True)
    lm = model.model.language_model
    tokens = greedy_continue(lm, model.lm_head, embed, out, model.generation_config.eos_token_id,
                             int(positions.max()) + 1, (1, 1), MAX_NEW)
    return kept_idx[0].numpy(), tokens


@pytest.mark.parametrize("keep", [0.1, 0.25])
def test_pruned_chain_reproduces_torch_reference(gemma3_hf, gemma3_pipeline, photo, keep):
    image = photo.resize((400, 1300))  # 4 views: the image and 3 crops
    result = gemma3_pipeline.generate(image, QUESTION, keep=keep, max_new_tokens=MAX_NEW)
    expected_idx, expected_tokens = torch_reference(gemma3_hf, gemma3_pipeline, image, keep)
    np.testing.assert_array_equal(result.kept_indices, expected_idx)
    assert result.token_ids == expected_tokens and len(set(expected_tokens)) >= 3
    assert result.stats.visual_tokens_kept == token_budget(keep, 4 * TOKENS)


def test_text_only_gemma_and_unsupported_settings_are_refused(tmp_path):
    from zspa.errors import InvalidInputError, ModelLoadError
    from zspa.export.exporter import ExportOptions, export_bundle
    from zspa.families import family_for_model_type

    with pytest.raises(ModelLoadError, match="text-only"):
        family_for_model_type("gemma3_text")
    with pytest.raises(InvalidInputError, match="bidirectional image blocks"):
        export_bundle(ExportOptions("tiny-random-gemma3", tmp_path / "shared", kv_cache="shared", progress=False))
    with pytest.raises(InvalidInputError, match="Gemma 3"):
        export_bundle(ExportOptions("tiny-random-llava", tmp_path / "llava", pan_and_scan=True, progress=False))
    assert not (tmp_path / "shared").exists() and not (tmp_path / "llava").exists()


def test_build_profiles_count_views(gemma3_bundle):
    """The vision graph takes an image's views as its batch (1, or the image and up to 4 crops);
    the decoder's image_block_ids spans the whole sequence, as its attention mask."""
    from zspa.manifest import Manifest
    from zspa.runtime.engines import ShapeRanges, optimisation_profile

    manifest = Manifest.read(gemma3_bundle / "manifest.json")
    ranges = ShapeRanges.for_manifest(manifest, max_context=4096)
    vision = optimisation_profile(manifest.graphs["vision"], ranges)
    assert vision["pixel_values"][0] == (1, 3, 128, 128) and vision["pixel_values"][2] == (5, 3, 128, 128)
    decoder = optimisation_profile(manifest.graphs["decoder"], ranges)
    assert decoder["image_block_ids"] == decoder["attention_mask"] and decoder["image_block_ids"][2] == (1, 4096)


def test_serve_answers_images_with_crops_over_two_turns(gemma3_pipeline, photo, tmp_path):
    """The service rebuilds the prompt once the images show their views, as the pipeline does."""
    import io

    import openai

    from zspa.testing import data_url, running_server

    images = [photo.resize((900, 400)), photo.resize((400, 1300))]
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    answer_text = "A hat."
    turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Look at this."}]},
             {"role": "assistant", "content": [{"type": "text", "text": answer_text}]},
             {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prepared = [gemma3_pipeline.prepare_image(data) for data in encoded]
    prompt = gemma3_pipeline.prompts.build_chat(turns, views=tuple(p.vision_input.views for p in prepared))
    expected = gemma3_pipeline.generate(prepared, prompt, keep=0.25, max_new_tokens=6)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(encoded[0],
                                                                                                   "image/png")}},
                                             {"type": "text", "text": "Look at this."}]},
                {"role": "assistant", "content": answer_text},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(encoded[1],
                                                                                                   "image/png")}},
                                             {"type": "text", "text": QUESTION}]}]
    with running_server(gemma3_pipeline.bundle.path, tmp_path / "serve.log") as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        answer = client.chat.completions.create(model=gemma3_pipeline.bundle.path.name, messages=messages,
                                                temperature=0, max_tokens=6, extra_body={"keep": 0.25})
    assert answer.choices[0].message.content == expected.text and expected.token_ids
    assert answer.usage.model_extra["visual_tokens_total"] == expected.stats.visual_tokens_total == 7 * TOKENS
