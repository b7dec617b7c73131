"""LLaVA-1.5 (`LlavaForConditionalGeneration`): CLIP ViT-L/14 tower, MLP projector, Llama decoder.

Declares what the generic exporter needs: how to load, the torch modules behind each graph, and
the manifest fields (preprocessing, chat template, KV-cache geometry, default position scheme).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from zspa.errors import ModelLoadError
from zspa.families import VisionExport, common
from zspa.manifest import ClipVisionSpec, DecoderSpec, TextSpec

NAME = "llava"

# Kept visual tokens keep their unpruned position ids by default, as TensorRT Edge-LLM's pruner
# does: GAP (arXiv 2506.21873) traces LLaVA's grounding collapse under pruning (RefCOCO 56.1 →
# 15.3) to renumbered positions, and recovers it (51.4) by preserving them. `--positions` overrides.
DEFAULT_POSITIONS = "original"


def load(source: str | Path, *, revision: str | None, local_files_only: bool):
    """Loads the model in fp32 with eager attention (what exports cleanly) and its processor."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(
        source,
        revision=revision,
        local_files_only=local_files_only,
        dtype=torch.float32,
        attn_implementation="eager",
    )
    processor = AutoProcessor.from_pretrained(source, revision=revision, local_files_only=local_files_only)
    return model.eval(), processor


class VisionGraph(nn.Module):
    """`pixel_values → image_features`: tower, feature-layer selection, CLS drop and projector,
    the steps of transformers' `LlavaModel.get_image_features` minus its per-image list split
    (which would pin the batch size in the exported graph)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.vision_tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        layers = model.config.vision_feature_layer
        self.feature_layers = [layers] if isinstance(layers, int) else list(layers)
        self.drop_cls = model.config.vision_feature_select_strategy == "default"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden_states = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
        selected = [hidden_states[layer] for layer in self.feature_layers]
        if self.drop_cls:
            selected = [h[:, 1:] for h in selected]
        return self.projector(torch.cat(selected, dim=-1))


def vision_export(model: nn.Module, processor, generator: torch.Generator, dtype: torch.dtype) -> VisionExport:
    """A batch of two random images at the processor's crop size (batch ≥ 2 keeps the axis symbolic)."""
    height, width = image_size(processor)
    pixel_values = torch.randn(2, 3, height, width, generator=generator).to(dtype)
    return VisionExport(VisionGraph(model).eval(), {"pixel_values": pixel_values},
                        {"pixel_values": {0: "batch_size"}, "image_features": {0: "batch_size"}},
                        {"pixel_values": pixel_values[:1]})


embedding = common.embedding
language_model = common.language_model


def image_size(processor) -> tuple[int, int]:
    crop = processor.image_processor.crop_size
    return int(crop["height"]), int(crop["width"])


def vision_spec(model: nn.Module, processor, num_tokens: int) -> ClipVisionSpec:
    ip = processor.image_processor
    if getattr(ip, "do_pad", False):
        raise ModelLoadError("LLaVA image processors with do_pad=True (pad to square) are not supported yet")
    if not ip.do_resize or "shortest_edge" not in ip.size:
        raise ModelLoadError(f"unsupported LLaVA resize settings: do_resize={ip.do_resize}, size={dict(ip.size)}")
    return ClipVisionSpec(
        kind="clip",
        image_size=list(image_size(processor)),
        resize_shortest_edge=int(ip.size["shortest_edge"]),
        center_crop=bool(ip.do_center_crop),
        **common.image_normalisation(ip),
        num_tokens=num_tokens,
        hidden_size=int(model.config.text_config.hidden_size),
    )


def text_spec(model: nn.Module, processor) -> TextSpec:
    template = processor.chat_template or getattr(processor.tokenizer, "chat_template", None)
    if not template:
        raise ModelLoadError("the processor has no chat template; save one with the model (processor.chat_template)")
    return common.text_spec(model, processor.tokenizer, processor.image_token, template)


def decoder_spec(model: nn.Module, kv_dtype: str) -> DecoderSpec:
    return common.decoder_spec(model, kv_dtype, DEFAULT_POSITIONS)
