"""Model families: one declarative module per architecture (optimum's model_configs pattern).

A family says how to load its transformers model and processor, which torch modules make the
vision, embed and decoder graphs, and what the runtime needs in the manifest. The exporter stays
generic. Importing this package is light; family modules import torch and transformers.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from zspa.errors import ModelLoadError

# Short names for the models people deploy most; any Hugging Face id or local directory works too.
MODEL_ALIASES = {
    "llava": "llava-hf/llava-1.5-7b-hf",
    "llava-7b": "llava-hf/llava-1.5-7b-hf",
    "llava-13b": "llava-hf/llava-1.5-13b-hf",
    "qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct",
    "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
    "qwen2-vl-2b": "Qwen/Qwen2-VL-2B-Instruct",
    "qwen2-vl-7b": "Qwen/Qwen2-VL-7B-Instruct",
    "qwen3-vl-2b": "Qwen/Qwen3-VL-2B-Instruct",
    "qwen3-vl-4b": "Qwen/Qwen3-VL-4B-Instruct",
    "qwen3-vl-8b": "Qwen/Qwen3-VL-8B-Instruct",
    "internvl3-1b": "OpenGVLab/InternVL3-1B-hf",
    "internvl3-2b": "OpenGVLab/InternVL3-2B-hf",
    "internvl3-8b": "OpenGVLab/InternVL3-8B-hf",
    "gemma-3-4b": "google/gemma-3-4b-it",
    "gemma-3-12b": "google/gemma-3-12b-it",
}

# transformers `model_type` → family module name
FAMILY_BY_MODEL_TYPE = {"llava": "llava", "qwen2_5_vl": "qwen2_5_vl", "qwen2_vl": "qwen2_vl", "qwen3_vl": "qwen3_vl",
                        "internvl": "internvl", "gemma3": "gemma3"}

# Model types refused with a reason rather than "not supported yet".
REFUSED_MODEL_TYPES = {
    "qwen3_vl_moe": "Qwen3-VL's mixture-of-experts models (30B-A3B) need an expert-routing decoder zspa does not "
                    "export yet; the dense Qwen3-VL models (qwen3-vl-2b, -4b, -8b) are supported",
    "gemma3_text": "Gemma 3 1B (and every gemma3_text checkpoint) is text-only: it has no vision tower, so there "
                   "are no visual tokens to prune; the vision models are gemma-3-4b and gemma-3-12b",
}

# Built-in random-weight models, built from configs (no download): name → "module:function"
# returning (model, processor). A family adds its tiny model here.
TINY_MODELS = {
    "tiny-random-llava": "zspa.export.tiny:build_tiny_llava",
    "tiny-random-qwen2.5-vl": "zspa.export.tiny_qwen:build_tiny_qwen",
    "tiny-random-qwen2-vl": "zspa.export.tiny_qwen:build_tiny_qwen2",
    "tiny-random-qwen3-vl": "zspa.export.tiny_qwen:build_tiny_qwen3",
    "tiny-random-internvl3": "zspa.export.tiny_internvl:build_tiny_internvl3",
    "tiny-random-gemma3": "zspa.export.tiny_gemma3:build_tiny_gemma3",
}


def build_tiny_model(name: str):
    """(model, processor) of the built-in tiny model `name`."""
    module, _, function = TINY_MODELS[name].partition(":")
    return getattr(importlib.import_module(module), function)()


@dataclass
class VisionExport:
    """What the exporter needs to trace a family's vision graph: the module, example inputs (by
    graph input name, in order), which axes are symbolic and its outputs, `image_features` first
    (then any DeepStack planes, which the pruner's kept indices gather too)."""

    module: Any
    example: dict[str, Any]
    dynamic_axes: dict[str, dict[int, str]]
    parity_example: dict[str, Any]  # one image, for the export-time parity check
    output_names: list[str] = field(default_factory=lambda: ["image_features"])


def family_for_model_type(model_type: str):
    """Returns the family module for a transformers `model_type`, or a clear error."""
    name = FAMILY_BY_MODEL_TYPE.get(model_type)
    if model_type in REFUSED_MODEL_TYPES:
        raise ModelLoadError(f"model type {model_type!r} is not supported: {REFUSED_MODEL_TYPES[model_type]}")
    if name is None:
        supported = ", ".join(sorted(FAMILY_BY_MODEL_TYPE))
        raise ModelLoadError(f"model type {model_type!r} is not supported yet (supported: {supported})")
    return importlib.import_module(f"zspa.families.{name}")
