"""InternVL3 / InternVL3.5 (`InternVLForConditionalGeneration`, the `-hf` checkpoints): an
InternViT tower on 448 px tiles, pixel shuffle 0.5 and an MLP projector → 256 tokens per tile, a
Qwen2 (or Qwen3) decoder with 1-D positions.

An image is tiled (1–12 tiles on the grid closest to its aspect ratio, plus a thumbnail:
`runtime/tiles.py`, equal to `GotOcr2ImageProcessorPil`); the vision graph takes the tiles as its
batch and returns all their tokens as one block, which the processor wraps in `<img>…</img>`
(`TextSpec.image_text`). The pruning budget covers every tile of an image, the thumbnail included.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from zspa.errors import ModelLoadError
from zspa.export.vision_attention import TiledImageFeatures
from zspa.families import VisionExport, common
from zspa.families.qwen2_5_vl import ImageTextProcessor, chat_template_of
from zspa.manifest import DecoderSpec, TextSpec, TileVisionSpec
from zspa.runtime.tiles import most_tiles

NAME = "internvl"

# As LLaVA: kept tokens keep their unpruned 1-D positions (GAP, arXiv 2506.21873).
DEFAULT_POSITIONS = "original"


def load(source: str | Path, *, revision: str | None, local_files_only: bool):
    """The model in fp32 with eager attention, its PIL tile processor, tokenizer and chat template
    (InternVLProcessor insists on a video processor that needs torchvision)."""
    from transformers import AutoTokenizer, GotOcr2ImageProcessorPil, InternVLForConditionalGeneration

    kwargs = {"revision": revision, "local_files_only": local_files_only}
    model = InternVLForConditionalGeneration.from_pretrained(source, dtype=torch.float32,
                                                             attn_implementation="eager", **kwargs)
    image_processor = GotOcr2ImageProcessorPil.from_pretrained(source, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    return model.eval(), ImageTextProcessor(image_processor, tokenizer, chat_template_of(source, tokenizer, kwargs))


def vision_export(model: nn.Module, processor, generator: torch.Generator, dtype: torch.dtype) -> VisionExport:
    """Three random tiles (a symbolic tile axis); parity on one. The graph is transformers'
    `get_image_features` (tower, CLS drop, pixel shuffle, projector) over an image's tiles, one block
    of 256 tokens a tile; the tower's attention (1,025 tokens a tile, unmasked) fused."""
    features = TiledImageFeatures(model, vision_feature_layer=model.config.vision_feature_layer,
                                  vision_feature_select_strategy=model.config.vision_feature_select_strategy)
    return common.batched_image_export(features, processor, 3, generator, dtype)


embedding = common.embedding
language_model = common.language_model


def vision_spec(model: nn.Module, processor, num_tokens: int) -> TileVisionSpec:
    """`num_tokens` becomes the most one image can give: every tile and the thumbnail."""
    ip = processor.image_processor
    if not ip.do_resize:
        raise ModelLoadError("InternVL image processors without do_resize are not supported")
    # InternVLProcessor calls its image processor with crop_to_patches=True whatever the
    # checkpoint's preprocessor_config.json says, so that is what the model was run with.
    tiles = ip.max_patches > 1
    tokens_per_tile = int(model.config.image_seq_length)
    max_tiles = int(ip.max_patches) if tiles else 1
    spec = TileVisionSpec(
        kind="internvl",
        **common.image_normalisation(ip),
        num_tokens=0,
        hidden_size=int(model.config.text_config.hidden_size),
        tile_size=list(common.processor_size(processor)),
        min_tiles=int(ip.min_patches) if tiles else 1,
        max_tiles=max_tiles,
        use_thumbnail=bool(tiles),
        tokens_per_tile=tokens_per_tile,
    )
    return dataclasses.replace(spec, num_tokens=most_tiles(spec) * tokens_per_tile)


def text_spec(model: nn.Module, processor) -> TextSpec:
    if not processor.chat_template:
        raise ModelLoadError("the checkpoint has no chat template (chat_template.jinja or chat_template.json)")
    tokenizer = processor.tokenizer
    image_token = tokenizer.convert_ids_to_tokens(int(model.config.image_token_id))
    start, end = getattr(tokenizer, "start_image_token", "<img>"), getattr(tokenizer, "end_image_token", "</img>")
    spec = common.text_spec(model, tokenizer, image_token, processor.chat_template)
    return dataclasses.replace(spec, image_text=f"{start}{image_token}{end}")


def decoder_spec(model: nn.Module, kv_dtype: str) -> DecoderSpec:
    return common.decoder_spec(model, kv_dtype, DEFAULT_POSITIONS)
