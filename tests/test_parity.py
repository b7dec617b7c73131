"""The ONNX chain against Hugging Face transformers on the same weights (issue 3, point 3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from zspa.manifest import Manifest
from zspa.pruning import METHOD_DEFAULTS
from zspa.pruning.budget import token_budget
from zspa.runtime.positions import prefill_positions

from references import greedy_continue
from torch_pruners import PrunerGraph, ZSPASelector

QUESTION = "What is the man wearing on his head?"
MAX_NEW = 12


def hf_prompt(processor, question=QUESTION):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def test_manifest_records_export_parity(tiny_bundle):
    parity = Manifest.read(tiny_bundle / "manifest.json").parity
    assert set(parity) == {"vision_max_abs_diff", "embed_max_abs_diff", "logits_max_abs_diff"}
    assert all(0 <= v < 1e-4 for v in parity.values())


def test_keep_one_reproduces_hf_generate(tiny_hf, pipeline, photo_path):
    model, processor = tiny_hf
    image = Image.open(photo_path)
    inputs = processor(images=image, text=hf_prompt(processor), return_tensors="pt")
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    result = pipeline.generate(photo_path, QUESTION, keep=1.0, max_new_tokens=MAX_NEW)
    eos = set(pipeline.bundle.manifest.text.eos_token_ids)
    assert result.token_ids == [t for t in expected.tolist() if t not in eos]
    assert result.stats.visual_tokens_kept == 576


def test_two_images_at_keep_one_reproduce_hf_generate(tiny_hf, pipeline, photo_path, rgba_png_path):
    """Two image blocks with text between them, as transformers' processor lays them out."""
    model, processor = tiny_hf
    images = [Image.open(rgba_png_path), Image.open(photo_path)]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is this"},
                                             {"type": "image"}, {"type": "text", "text": "the same thing?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=images, text=text, return_tensors="pt")
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    result = pipeline.generate([rgba_png_path, photo_path], pipeline.prompts.build_chat(messages), keep=1.0,
                               max_new_tokens=MAX_NEW)
    eos = set(pipeline.bundle.manifest.text.eos_token_ids)
    assert result.token_ids == [t for t in expected.tolist() if t not in eos] and len(set(result.token_ids)) >= 3
    assert result.stats.visual_tokens_kept == 2 * 576 == (inputs["input_ids"] == model.config.image_token_id).sum()


def test_logprobs_equal_transformers_scores(tiny_hf, pipeline, photo_path):
    """Each answer token's log-probability and the top 3 equal the log-softmax of transformers'
    logits at that step (keep 1.0, greedy)."""
    model, processor = tiny_hf
    inputs = processor(images=Image.open(photo_path), text=hf_prompt(processor), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    expected = [torch.log_softmax(step[0].double(), -1) for step in out.logits]
    result = pipeline.generate(photo_path, QUESTION, keep=1.0, max_new_tokens=MAX_NEW, logprobs=3)
    assert [entry.token_id for entry in result.logprobs] == result.token_ids and len(result.token_ids) >= 4
    for entry, logprobs in zip(result.logprobs, expected):
        assert entry.logprob == pytest.approx(float(logprobs[entry.token_id]), abs=1e-4)
        top = torch.topk(logprobs, 3)
        assert [token for token, _ in entry.top] == top.indices.tolist() and entry.top[0][0] == entry.token_id
        np.testing.assert_allclose([value for _, value in entry.top], top.values.numpy(), atol=1e-4)


def test_score_is_the_continuation_s_log_probability_under_transformers(tiny_hf, pipeline, photo_path):
    model, processor = tiny_hf
    continuation = pipeline.prompts.encode_text(" A red hat on a chair")
    total, greedy = pipeline.score(photo_path, QUESTION, continuation, keep=1.0)
    inputs = processor(images=Image.open(photo_path), text=hf_prompt(processor), return_tensors="pt")
    ids = torch.cat([inputs["input_ids"], torch.tensor([continuation])], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=inputs["pixel_values"], attention_mask=torch.ones_like(ids)).logits
    start = inputs["input_ids"].shape[1] - 1  # the logits at the last prompt token predict the first answer token
    logprobs = torch.log_softmax(logits[0, start:start + len(continuation)].double(), -1)
    assert total == pytest.approx(float(sum(logprobs[i, t] for i, t in enumerate(continuation))), abs=1e-3)
    transformers_greedy = all(int(logprobs[i].argmax()) == t for i, t in enumerate(continuation))
    assert greedy == transformers_greedy and not greedy  # a made-up answer is not the greedy one
    answer = pipeline.generate(photo_path, QUESTION, keep=1.0, max_new_tokens=5).token_ids
    assert pipeline.score(photo_path, QUESTION, answer, keep=1.0)[1] is True  # the greedy answer is greedy


def test_runtime_prompt_ids_match_hf_processor(tiny_hf, pipeline, photo_path):
    """Same ids as the transformers processor, with its N image tokens collapsed into one slot."""
    _, processor = tiny_hf
    ids = processor(images=Image.open(photo_path), text=hf_prompt(processor), return_tensors="np")["input_ids"][0]
    image_id = pipeline.bundle.manifest.text.image_token_id
    collapsed = [t for i, t in enumerate(ids) if t != image_id or ids[i - 1] != image_id]
    assert pipeline.prompts.build(QUESTION).input_ids.tolist() == collapsed


@torch.no_grad()
def torch_reference(model, processor, image_path, keep_k, positions_scheme,
                    alpha=METHOD_DEFAULTS["zspa"]["relevance_ratio"], pooling=METHOD_DEFAULTS["zspa"]["pooling"]):
    """LLaVA in PyTorch, pruned the ZSPAPrune way before the decoder, decoded greedily.

    Shares only the eager pruning module with the exporter; everything else is transformers.
    """
    from transformers import DynamicCache

    inputs = processor(images=Image.open(image_path), text=hf_prompt(processor), return_tensors="pt")
    ids = inputs["input_ids"][0]
    image_id = model.config.image_token_id
    image_slots = (ids == image_id).nonzero().flatten()
    before, after = ids[: image_slots[0]], ids[image_slots[-1] + 1 :]
    features = model.model.get_image_features(
        inputs["pixel_values"], vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
    ).pooler_output[0][None]
    embed = model.get_input_embeddings()
    text = torch.cat([before, torch.tensor([image_id]), after])
    text_embeds = embed(text[None])
    # Question mask from the processor's own tokenizer offsets over the templated prompt.
    rendered = hf_prompt(processor)
    start = rendered.index(QUESTION)
    enc = processor.tokenizer(rendered, return_offsets_mapping=True)
    offsets = np.array(enc["offset_mapping"])
    question = torch.tensor(((offsets[:, 1] > start) & (offsets[:, 0] < start + len(QUESTION))).astype(np.int64))
    question[torch.tensor(enc["input_ids"]) == image_id] = 0
    kept, kept_idx = PrunerGraph(ZSPASelector(alpha, pooling), keep_k)(features, text_embeds, question[None])
    sequence = torch.cat([embed(before[None]), kept, embed(after[None])], dim=1)
    positions = torch.from_numpy(prefill_positions([len(before), len(after)], [kept_idx[0].numpy()],
                                                   [(1, 1, features.shape[1])], positions_scheme))[None]
    cache = DynamicCache()
    lm = model.model.language_model
    out = lm(inputs_embeds=sequence, position_ids=positions, cache=cache, use_cache=True)
    tokens = greedy_continue(lm, model.lm_head, embed, out, {processor.tokenizer.eos_token_id},
                             int(positions[0, -1]) + 1, (1, 1), MAX_NEW)
    return kept_idx[0].numpy(), tokens


@pytest.mark.parametrize("keep", [0.1, 0.25])
@pytest.mark.parametrize("scheme", ["original", "contiguous"])
def test_pruned_chain_reproduces_torch_reference(tiny_hf, tiny_bundle, photo_path, keep, scheme):
    from zspa.runtime.pipeline import Pipeline

    model, processor = tiny_hf
    pipeline = Pipeline.load(tiny_bundle, positions=scheme)
    result = pipeline.generate(photo_path, QUESTION, keep=keep, max_new_tokens=MAX_NEW)
    k = token_budget(keep, 576)
    expected_idx, expected_tokens = torch_reference(model, processor, photo_path, k, scheme)
    np.testing.assert_array_equal(result.kept_indices, expected_idx)
    assert result.token_ids == expected_tokens
    assert result.stats.visual_tokens_kept == k


def test_position_scheme_reaches_the_decoder(tiny_bundle, photo_path):
    """Same kept tokens, different position ids: the greedy answers of the two schemes differ."""
    from zspa.runtime.pipeline import Pipeline

    runs = [Pipeline.load(tiny_bundle, positions=s).generate(photo_path, QUESTION, keep=0.1, max_new_tokens=MAX_NEW)
            for s in ("contiguous", "original")]
    np.testing.assert_array_equal(runs[0].kept_indices, runs[1].kept_indices)
    assert runs[0].token_ids != runs[1].token_ids
