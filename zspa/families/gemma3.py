"""Gemma 3 (`Gemma3ForConditionalGeneration`: 4B, 12B, 27B): a SigLIP tower at 896 px, the 4×4
average pool, RMSNorm and a projection matrix → 256 tokens per view, a Gemma 3 decoder with 1-D
positions, sliding-window local layers and global layers (two rope bases), the embedding scale,
and bidirectional attention inside each image block.

An image is one view (resized to the tower's square), or with pan&scan the view and its crops
(`runtime/views.py`), each a block of its own in the prompt; the vision graph takes the views as
its batch and returns their tokens in order. The pruning budget covers all of an image's views,
chosen from one pool; each view's kept tokens stay one bidirectional block (`image_block_ids`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from zspa.errors import ModelLoadError
from zspa.export.vision_attention import TiledImageFeatures
from zspa.families import VisionExport, common
from zspa.families.qwen2_5_vl import chat_template_of
from zspa.manifest import DecoderSpec, TextSpec, ViewVisionSpec
from zspa.runtime.views import most_views

NAME = "gemma3"

# As LLaVA: kept tokens keep their unpruned 1-D positions (GAP, arXiv 2506.21873).
DEFAULT_POSITIONS = "original"

# Gemma3Processor's call defaults for pan&scan, which it applies where preprocessor_config.json
# has null (the released checkpoints have null everywhere: pan&scan off).
PAN_AND_SCAN_DEFAULTS = {"pan_and_scan_min_crop_size": 256, "pan_and_scan_max_num_crops": 4,
                         "pan_and_scan_min_ratio_to_activate": 1.2}


def load(source: str | Path, *, revision: str | None, local_files_only: bool):
    """The model in fp32 with eager attention and `Gemma3Processor` over its PIL image processor
    (it needs no torchvision). `do_pan_and_scan` is what the checkpoint's preprocessor_config.json
    says (the processor's own call would switch it off)."""
    from transformers import AutoTokenizer, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil, Gemma3Processor

    kwargs = {"revision": revision, "local_files_only": local_files_only}
    model = Gemma3ForConditionalGeneration.from_pretrained(source, dtype=torch.float32, attn_implementation="eager",
                                                           **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    processor = Gemma3Processor(Gemma3ImageProcessorPil.from_pretrained(source, **kwargs), tokenizer,
                                chat_template=chat_template_of(source, tokenizer, kwargs),
                                image_seq_length=int(model.config.mm_tokens_per_image))
    return model.eval(), processor


def pan_and_scan_settings(image_processor) -> dict:
    """`do_pan_and_scan` and its bounds as the checkpoint's image processor has them, Gemma3Processor's
    defaults where it has none."""
    settings = {name: getattr(image_processor, name, None) for name in PAN_AND_SCAN_DEFAULTS}
    settings = {name: default if settings[name] is None else settings[name]
                for name, default in PAN_AND_SCAN_DEFAULTS.items()}
    return {"do_pan_and_scan": bool(getattr(image_processor, "do_pan_and_scan", None)), **settings}


def vision_export(model: nn.Module, processor, generator: torch.Generator, dtype: torch.dtype) -> VisionExport:
    """Two random views (a symbolic view axis); parity on one. The graph is transformers'
    `get_image_features` (SigLIP, average pool, RMSNorm, projection) over an image's views; the
    tower's attention (4,096 patches a view at 896 px, unmasked) fused."""
    return common.batched_image_export(TiledImageFeatures(model), processor, 2, generator, dtype)


embedding = common.embedding
language_model = common.language_model


def vision_spec(model: nn.Module, processor, num_tokens: int) -> ViewVisionSpec:
    """`num_tokens` becomes the most one image can give: the view and, with pan&scan, its most crops."""
    ip = processor.image_processor
    if not ip.do_resize:
        raise ModelLoadError("Gemma 3 image processors without do_resize are not supported")
    pan_and_scan = pan_and_scan_settings(ip)
    spec = ViewVisionSpec(
        kind="gemma3",
        **common.image_normalisation(ip),
        num_tokens=0,
        hidden_size=int(model.config.text_config.hidden_size),
        image_size=list(common.processor_size(processor)),
        tokens_per_tile=int(model.config.mm_tokens_per_image),
        pan_and_scan=pan_and_scan["do_pan_and_scan"],
        min_crop_size=int(pan_and_scan["pan_and_scan_min_crop_size"]),
        max_crops=int(pan_and_scan["pan_and_scan_max_num_crops"]),
        min_ratio=float(pan_and_scan["pan_and_scan_min_ratio_to_activate"]),
    )
    return dataclasses.replace(spec, num_tokens=most_views(spec) * spec.tokens_per_tile)


def text_spec(model: nn.Module, processor) -> TextSpec:
    """The template writes `<start_of_image>` per image; the processor makes each view
    "\\n\\n<start_of_image>" + 256 × `<image_soft_token>` + "<end_of_image>\\n\\n", and an image
    with crops "Here is the original image {view} and here are some crops to help you see
    better {crop} {crop} …". The template writes BOS itself."""
    if not processor.chat_template:
        raise ModelLoadError("the checkpoint has no chat template (chat_template.jinja or chat_template.json)")
    tokenizer = processor.tokenizer
    image_token = tokenizer.convert_ids_to_tokens(int(model.config.image_token_id))
    spec = common.text_spec(model, tokenizer, image_token, processor.chat_template)
    return dataclasses.replace(
        spec, add_special_tokens=False, template_image=tokenizer.boi_token,
        image_text=f"\n\n{tokenizer.boi_token}{image_token}{tokenizer.eoi_token}\n\n",
        views_text="Here is the original image {first} and here are some crops to help you see better {rest}")


def decoder_spec(model: nn.Module, kv_dtype: str) -> DecoderSpec:
    return dataclasses.replace(common.decoder_spec(model, kv_dtype, DEFAULT_POSITIONS), image_blocks=True)
