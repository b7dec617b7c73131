"""Qwen2-VL (`Qwen2VLForConditionalGeneration`): Qwen2.5-VL's path without attention windows.

The tower (LayerNorm blocks with a GELU MLP, a LayerNorm patch merger) attends over the whole
image in every block, so its graph takes `pixel_values [num_patches, 3·2·14·14]` and the rotary
positions only; preprocessing, the 2×2 merge, M-RoPE in the Qwen2 decoder and the chat template
are Qwen2.5-VL's, and so is everything else here.
"""

from __future__ import annotations

from pathlib import Path

from zspa.families.qwen2_5_vl import (  # noqa: F401 (the family interface, shared with Qwen2.5-VL)
    DEFAULT_POSITIONS,
    decoder_spec,
    embedding,
    language_model,
    load_qwen,
    text_spec,
    vision_export,
    vision_spec,
)

NAME = "qwen2_vl"


def load(source: str | Path, *, revision: str | None, local_files_only: bool):
    from transformers import Qwen2VLForConditionalGeneration

    return load_qwen(Qwen2VLForConditionalGeneration, source, revision=revision, local_files_only=local_files_only)
