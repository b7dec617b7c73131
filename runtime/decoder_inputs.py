"""The decoder graph's optional inputs, past embeddings, mask, positions and the KV cache: the one
place that knows which a graph takes (from its manifest spec) and what a step that gives none feeds.

- `deepstack_embeds` [L, B, S, D] (Qwen3-VL's DeepStack planes): zeros where not given (decode steps).
- `image_block_ids` [B, total length] (Gemma 3's bidirectional image blocks, 0 for text): zeros
  where not given (decode steps: a text query attends causally, which already sees every block).

Every decoder session (onnxruntime, TensorRT, calibration's recorder) binds what `optional_inputs`
returns, so a new optional input is added here and in the exporter only.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from zspa.errors import InvalidInputError
from zspa.manifest import DecoderSpec

Extras = Mapping[str, np.ndarray]


def optional_inputs(spec: DecoderSpec, inputs_embeds: np.ndarray, attention_mask: np.ndarray,
                    extras: Extras | None) -> dict[str, np.ndarray]:
    """The optional inputs `spec`'s graph takes for this step: each given one checked against the
    shape the step needs, zeros for the others. Extras the graph does not take are ignored."""
    extras = extras or {}
    shapes = {}
    if spec.deepstack_layers:
        shapes["deepstack_embeds"] = ((spec.deepstack_layers, *inputs_embeds.shape), inputs_embeds.dtype)
    if spec.image_blocks:
        shapes["image_block_ids"] = (attention_mask.shape, np.int64)
    feeds = {}
    for name, (shape, dtype) in shapes.items():
        value = extras.get(name)
        if value is None:
            value = np.zeros(shape, dtype=dtype)
        elif value.shape != shape:
            raise InvalidInputError(f"decoder input {name} of shape {value.shape}; this step takes {shape}")
        feeds[name] = np.ascontiguousarray(value, dtype=dtype)
    return feeds


def image_block_ids(rows: list[np.ndarray], length: int) -> np.ndarray:
    """`image_block_ids` [1, length] of a prefill whose i-th image block sits at `rows[i]`."""
    ids = np.zeros((1, length), dtype=np.int64)
    for block, block_rows in enumerate(rows, start=1):
        ids[0, block_rows] = block
    return ids
