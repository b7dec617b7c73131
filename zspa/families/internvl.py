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
from zspa.export.vision_attention import tower_attention
from zspa.families import VisionExport, common
from zspa.families.qwen2_5_vl import ImageTextProcessor, chat_template_of
from zspa.manifest import DecoderSpec, TextSpec, TileVisionSpec
from zspa.runtime.tiles import most_tiles

NAME = "internvl"
FUSED_ATTENTION = "zspa_fused_tower"  # the name the tower's attention function is registered under

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


class VisionGraph(nn.Module):
    """`pixel_values [T, 3, H, W] → image_features [1, T·256, D]`: transformers'
    `get_image_features` (tower, CLS drop, pixel shuffle, projector) over an image's tiles, the
    tiles' tokens in order as one block. The tower's attention (1,025 tokens a tile, unmasked) runs
    through onnxruntime's fused MultiHeadAttention (export/vision_attention.py), registered as a
    transformers attention function, so transformers' own blocks are what is exported."""

    def __init__(self, model: nn.Module):
        super().__init__()
        from transformers import AttentionInterface

        AttentionInterface.register(FUSED_ATTENTION, tower_attention)
        model.model.vision_tower.config._attn_implementation = FUSED_ATTENTION
        self.model = model.model
        self.layer = model.config.vision_feature_layer
        self.strategy = model.config.vision_feature_select_strategy

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.model.get_image_features(pixel_values, vision_feature_layer=self.layer,
                                                 vision_feature_select_strategy=self.strategy).pooler_output
        return features.reshape(1, -1, features.shape[-1])


def vision_export(model: nn.Module, processor, generator: torch.Generator, dtype: torch.dtype) -> VisionExport:
    """Three random tiles (a symbolic tile axis); parity on one."""
    height, width = _tile_size(processor)
    pixel_values = torch.randn(3, 3, height, width, generator=generator).to(dtype)
    return VisionExport(VisionGraph(model).eval(), {"pixel_values": pixel_values},
                        {"pixel_values": {0: "num_tiles"}, "image_features": {1: "num_visual_tokens"}},
                        {"pixel_values": pixel_values[:1]})


def embedding(model: nn.Module) -> nn.Module:
    return model.get_input_embeddings()


def language_model(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    return model.model.language_model, model.lm_head


def _tile_size(processor) -> tuple[int, int]:
    size = processor.image_processor.size
    return int(size["height"]), int(size["width"])


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
        resample=int(ip.resample),
        rescale_factor=float(ip.rescale_factor) if ip.do_rescale else 1.0,
        mean=[float(x) for x in ip.image_mean] if ip.do_normalize else [0.0, 0.0, 0.0],
        std=[float(x) for x in ip.image_std] if ip.do_normalize else [1.0, 1.0, 1.0],
        num_tokens=0,
        hidden_size=int(model.config.text_config.hidden_size),
        tile_size=list(_tile_size(processor)),
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
