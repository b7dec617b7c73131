"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): a windowed ViT at native resolution with a 2×2
patch merger, and a Qwen2 decoder with M-RoPE (3-D position ids).

The vision graph takes the processor's pre-patched `pixel_values [num_patches, 3·2·14·14]` plus
the index tensors transformers computes with Python loops (rotary positions, window order and
windows; `transformers.vision_utils`), which the runtime computes per image in numpy
(`runtime/qwen_vision.py`), so the number of patches, and N, follow the image. Window attention
runs as a batch of equal windows (edge windows padded, padded keys masked): O(P·window) work,
as transformers' per-window loop, where one masked P×P attention would cost O(P²); the
full-attention blocks go through onnxruntime's fused MultiHeadAttention (export/vision_attention.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zspa.errors import ModelLoadError
from zspa.export.vision_attention import full_attention
from zspa.families import VisionExport, common
from zspa.manifest import DecoderSpec, PatchVisionSpec, TextSpec

NAME = "qwen2_5_vl"
DEFAULT_POSITIONS = "original"  # DESIGN §6: M-RoPE families keep each token's own (t, h, w)
# The example image the vision graph is traced with: a grid of patches with several windows.
EXAMPLE_GRID = (16, 20)


@dataclass
class ImageTextProcessor:
    """The image processor and tokenizer, loaded on their own: transformers 5's Qwen2_5_VLProcessor
    insists on a video processor that needs torchvision, which a deployment machine may lack."""

    image_processor: Any
    tokenizer: Any
    chat_template: str | None


def load(source: str | Path, *, revision: str | None, local_files_only: bool):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return load_qwen(Qwen2_5_VLForConditionalGeneration, source, revision=revision, local_files_only=local_files_only)


def load_qwen(model_class: type, source: str | Path, *, revision: str | None, local_files_only: bool):
    """A Qwen-VL model of `model_class` with its PIL image processor, tokenizer and chat template."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    model = model_class.from_pretrained(
        source, revision=revision, local_files_only=local_files_only, dtype=torch.float32,
        attn_implementation="eager",
    )
    kwargs = {"revision": revision, "local_files_only": local_files_only}
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(source, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    return model.eval(), ImageTextProcessor(image_processor, tokenizer, chat_template_of(source, tokenizer, kwargs))


def chat_template_of(source, tokenizer, kwargs) -> str | None:
    """The processor's chat template (chat_template.jinja, or chat_template.json on older
    checkpoints), falling back to the tokenizer's."""
    import json

    from transformers.utils import cached_file

    for name in ("chat_template.jinja", "chat_template.json"):
        path = cached_file(source, name, _raise_exceptions_for_missing_entries=False, **kwargs)
        if path:
            text = Path(path).read_text(encoding="utf-8")
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return getattr(tokenizer, "chat_template", None)


class VisionGraph(nn.Module):
    """`pixel_values, vision_position_ids, window_index, window_slots, window_positions →
    image_features [1,N,D]`: the steps of `Qwen2_5_VisionTransformerPretrainedModel.forward` for one
    image, with transformers' per-window attention loop (which does not trace) as batched windows.
    Qwen2-VL's tower has no windows: `pixel_values, vision_position_ids` only, full attention in
    every block."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.visual = model.model.visual
        self.merge_unit = self.visual.spatial_merge_size**2
        self.full_blocks = set(getattr(self.visual, "fullatt_block_indexes", range(len(self.visual.blocks))))

    def forward(self, pixel_values, vision_position_ids, window_index=None, window_slots=None, window_positions=None):
        visual = self.visual
        hidden = patch_embedding(visual, pixel_values)
        patches = hidden.shape[0]

        def by_window(t):  # merge units reordered window by window, as transformers does
            if window_index is None:
                return t
            return t.reshape(patches // self.merge_unit, self.merge_unit, -1)[window_index].reshape(patches, -1)

        hidden = by_window(hidden)
        cos, sin = map(by_window, visual.rotary_pos_emb(hidden, vision_position_ids))
        if window_slots is not None:
            valid = window_slots >= 0
            slots = window_slots.clamp(min=0)
            padding = torch.zeros(valid.shape, dtype=torch.float32).masked_fill(~valid, torch.finfo(torch.float32).min)

        def windowed(q, k, v, scaling):  # [windows, window_patches, heads, head_dim], padded keys masked
            windows = _attend(q[slots], k[slots], v[slots], scaling, padding[:, None, None, :])
            return windows.reshape(-1, *windows.shape[2:])[window_positions]  # padded rows dropped

        for index, block in enumerate(visual.blocks):
            hidden = vision_block(block, hidden, cos, sin, full_attention if index in self.full_blocks else windowed)
        merged = visual.merger(hidden)
        if window_index is None:
            return merged.unsqueeze(0)
        order = torch.arange(window_index.shape[0], device=hidden.device)
        reverse = torch.zeros_like(window_index).scatter(0, window_index, order)
        return merged[reverse].unsqueeze(0)


def patch_embedding(visual: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The patch embedding, a Conv3d whose kernel is the whole patch, as one matrix product
    (onnxruntime's Conv took 4x longer than the MatMul on the same weights)."""
    projection = visual.patch_embed.proj
    weight = projection.weight
    hidden = pixel_values.to(weight.dtype) @ weight.reshape(weight.shape[0], -1).T
    return hidden if projection.bias is None else hidden + projection.bias


def vision_block(block: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 attend: Callable) -> torch.Tensor:
    """One pre-norm ViT block of the Qwen-VL towers: attention with 2-D rotary through `attend`
    (q, k, v [patches, heads, head_dim], scaling → [patches, heads, head_dim]), then the MLP."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    attention = block.attn
    patches = hidden.shape[0]
    qkv = attention.qkv(block.norm1(hidden)).reshape(patches, 3, attention.num_heads, -1)
    q, k, v = qkv.permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    hidden = hidden + attention.proj(attend(q, k, v, attention.scaling).reshape(patches, -1))
    return hidden + block.mlp(block.norm2(hidden))


def _attend(q, k, v, scaling: float, mask):
    """Eager attention over [batch, length, heads, head_dim] with an additive mask (softmax in
    float32, as transformers)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling + mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v).transpose(1, 2)


def vision_export(model: nn.Module, processor, generator: torch.Generator, dtype: torch.dtype) -> VisionExport:
    from zspa.runtime.qwen_vision import vision_indices

    cfg = model.config.vision_config
    grid_h, grid_w = EXAMPLE_GRID
    patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
    indices = vision_indices(grid_h, grid_w, cfg.spatial_merge_size, _window_size(cfg), cfg.patch_size)
    example = {"pixel_values": torch.randn(grid_h * grid_w, patch_dim, generator=generator).to(dtype),
               **{name: torch.from_numpy(value) for name, value in indices.items()}}
    axes = {"pixel_values": {0: "num_patches"}, "vision_position_ids": {0: "num_patches"},
            "window_index": {0: "num_visual_tokens"}, "window_slots": {0: "num_windows"},
            "window_positions": {0: "num_patches"}, "image_features": {1: "num_visual_tokens"}}
    return VisionExport(VisionGraph(model).eval(), example, {k: v for k, v in axes.items()
                                                            if k in example or k == "image_features"}, example)


def _window_size(vision_config) -> int:
    """Qwen2.5-VL's attention window in pixels; 0 for Qwen2-VL, whose tower has none."""
    return int(getattr(vision_config, "window_size", 0) or 0)


embedding = common.embedding
language_model = common.language_model


def vision_spec(model: nn.Module, processor, num_tokens: int) -> PatchVisionSpec:
    """`num_tokens` becomes the most one image can give (max_pixels over the merged patch area)."""
    ip = processor.image_processor
    cfg = model.config.vision_config
    size = dict(ip.size)
    min_pixels, max_pixels = int(size["shortest_edge"]), int(size["longest_edge"])
    if (ip.patch_size, ip.merge_size, ip.temporal_patch_size) != (
            cfg.patch_size, cfg.spatial_merge_size, cfg.temporal_patch_size):
        raise ModelLoadError("the image processor's patch, merge or temporal size differs from the vision config")
    return PatchVisionSpec(
        kind="qwen2_vl",
        **common.image_normalisation(ip),
        num_tokens=max_pixels // (cfg.patch_size * cfg.spatial_merge_size) ** 2,
        hidden_size=int(model.config.text_config.hidden_size),
        patch_size=int(cfg.patch_size),
        temporal_patch_size=int(cfg.temporal_patch_size),
        merge_size=int(cfg.spatial_merge_size),
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        window_size=_window_size(cfg),
    )


def text_spec(model: nn.Module, processor) -> TextSpec:
    if not processor.chat_template:
        raise ModelLoadError("the checkpoint has no chat template (chat_template.jinja or chat_template.json)")
    image_token = processor.tokenizer.convert_ids_to_tokens(int(model.config.image_token_id))
    return common.text_spec(model, processor.tokenizer, image_token, processor.chat_template)


def decoder_spec(model: nn.Module, kv_dtype: str) -> DecoderSpec:
    return common.decoder_spec(model, kv_dtype, DEFAULT_POSITIONS, mrope=True)
