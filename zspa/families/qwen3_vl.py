"""Qwen3-VL (`Qwen3VLForConditionalGeneration`): a ViT at native resolution (16 px patches, 2×2
merge) with a learned position table resampled to each image, and DeepStack: planes of visual
features from early tower blocks, added to the decoder's hidden states at the image positions
after its first layers. The decoder is Qwen3 with interleaved M-RoPE.

The vision graph takes the processor's patches, the rotary positions and the position table's
bilinear taps (`runtime/qwen_vision.py` computes both in numpy, as `transformers.vision_utils`
lets a caller precompute), so one graph serves any image size; every block attends over the whole
image. It returns `image_features` and one `deepstack_features_{i}` per DeepStack block. The
decoder takes the kept planes as `deepstack_embeds` (export/graphs.py); preprocessing, positions,
the chat template and loading are Qwen2.5-VL's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from zspa.errors import ModelLoadError
from zspa.export.vision_attention import full_attention
from zspa.families import VisionExport, common
from zspa.families.qwen2_5_vl import (  # noqa: F401 (the family interface, shared with Qwen2.5-VL)
    DEFAULT_POSITIONS,
    EXAMPLE_GRID,
    embedding,
    language_model,
    load_qwen,
    patch_embedding,
    text_spec,
    vision_block,
)
from zspa.families.qwen2_5_vl import vision_spec as _qwen_vision_spec
from zspa.manifest import DecoderSpec, PatchVisionSpec

NAME = "qwen3_vl"


def load(source: str | Path, *, revision: str | None, local_files_only: bool):
    from transformers import Qwen3VLForConditionalGeneration

    return load_qwen(Qwen3VLForConditionalGeneration, source, revision=revision, local_files_only=local_files_only)


class VisionGraph(nn.Module):
    """`pixel_values, vision_position_ids, position_embed_indices, position_embed_weights →
    image_features [1, N, D], deepstack_features_{i} [1, N, D]`: `Qwen3VLVisionModel.forward` for
    one image, its indices given rather than computed with Python loops."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.visual = model.model.visual
        self.deepstack = {block: i for i, block in enumerate(self.visual.deepstack_visual_indexes)}

    def forward(self, pixel_values, vision_position_ids, position_embed_indices, position_embed_weights):
        visual = self.visual
        hidden = patch_embedding(visual, pixel_values)
        taps = visual.pos_embed(position_embed_indices) * position_embed_weights[:, :, None].to(hidden.dtype)
        hidden = hidden + taps.sum(1)
        cos, sin = visual.rotary_pos_emb(hidden, vision_position_ids)
        planes = []
        for index, block in enumerate(visual.blocks):
            hidden = vision_block(block, hidden, cos, sin, full_attention)
            if index in self.deepstack:
                planes.append(visual.deepstack_merger_list[self.deepstack[index]](hidden).unsqueeze(0))
        return (visual.merger(hidden).unsqueeze(0), *planes)


def vision_export(model: nn.Module, processor, generator: torch.Generator, dtype: torch.dtype) -> VisionExport:
    from zspa.runtime.qwen_vision import vision_indices

    cfg = model.config.vision_config
    grid_h, grid_w = EXAMPLE_GRID
    patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
    indices = vision_indices(grid_h, grid_w, cfg.spatial_merge_size, 0, cfg.patch_size, _position_grid(cfg))
    example = {"pixel_values": torch.randn(grid_h * grid_w, patch_dim, generator=generator).to(dtype),
               **{name: torch.from_numpy(value) for name, value in indices.items()}}
    example["position_embed_weights"] = example["position_embed_weights"].to(dtype)
    outputs = ["image_features", *deepstack_names(model)]
    axes = {**{name: {0: "num_patches"} for name in example}, **{name: {1: "num_visual_tokens"} for name in outputs}}
    return VisionExport(VisionGraph(model).eval(), example, axes, example, outputs)


def deepstack_names(model: nn.Module) -> list[str]:
    """The vision graph's DeepStack outputs, one per block in `deepstack_visual_indexes`."""
    return [f"deepstack_features_{i}" for i in range(len(model.config.vision_config.deepstack_visual_indexes))]


def _position_grid(vision_config) -> int:
    side = int(round(vision_config.num_position_embeddings**0.5))
    if side * side != vision_config.num_position_embeddings:
        raise ModelLoadError(f"num_position_embeddings {vision_config.num_position_embeddings} is not a square grid")
    return side


def vision_spec(model: nn.Module, processor, num_tokens: int) -> PatchVisionSpec:
    spec = _qwen_vision_spec(model, processor, num_tokens)
    return dataclasses.replace(spec, kind=NAME, position_grid=_position_grid(model.config.vision_config))


def decoder_spec(model: nn.Module, kv_dtype: str) -> DecoderSpec:
    layers = len(model.config.vision_config.deepstack_visual_indexes)
    return common.decoder_spec(model, kv_dtype, DEFAULT_POSITIONS, mrope=True, deepstack_layers=layers)
