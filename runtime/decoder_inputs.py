"""The decoder graph's optional inputs, past embeddings, mask, positions and the KV cache: the one
place that knows which a graph takes (from its manifest spec) and what a step that gives none feeds.

- `deepstack_embeds` [L, B, S, D] (Qwen3-VL's DeepStack planes): zeros where not given (decode steps).
- `image_block_ids` [B, total length] (Gemma 3's bidirectional image blocks, 0 for text): zeros
  where not given (decode steps: a text query attends causally, which already sees every block).

Zeros are not copied: backends bind them from a zeroed device buffer, so a decode step moves no
optional-input bytes.

Every decoder session (onnxruntime, TensorRT, calibration's recorder) binds what `optional_inputs`
returns, so a new optional input is added here and in the exporter only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from zspa.errors import InvalidInputError
from zspa.manifest import DecoderSpec

Extras = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class OptionalInput:
    """One optional input of a step: its shape and dtype, and its value (None: zeros, which a
    backend binds from a zeroed buffer on the device rather than copying them every step)."""

    shape: tuple[int, ...]
    dtype: type
    value: np.ndarray | None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    def array(self) -> np.ndarray:
        """The value on the host, zeros materialised."""
        return np.zeros(self.shape, self.dtype) if self.value is None else self.value


def optional_inputs(spec: DecoderSpec, embeds_shape: tuple[int, ...], embeds_dtype: type,
                    mask_shape: tuple[int, ...], extras: Extras | None) -> dict[str, OptionalInput]:
    """The optional inputs `spec`'s graph takes for a step of embeddings `embeds_shape` [B, S, H]
    and mask `mask_shape` [B, total]: each given one checked against the shape the step needs,
    zeros for the others. Extras the graph does not take are ignored."""
    extras = extras or {}
    shapes = {}
    if spec.deepstack_layers:
        shapes["deepstack_embeds"] = ((spec.deepstack_layers, *embeds_shape), embeds_dtype)
    if spec.image_blocks:
        shapes["image_block_ids"] = (tuple(mask_shape), np.int64)
    inputs = {}
    for name, (shape, dtype) in shapes.items():
        value = extras.get(name)
        if value is not None:
            if value.shape != shape:
                raise InvalidInputError(f"decoder input {name} of shape {value.shape}; this step takes {shape}")
            value = np.ascontiguousarray(value, dtype=dtype)
        inputs[name] = OptionalInput(shape, dtype, value)
    return inputs


def image_block_ids(rows: list[np.ndarray], length: int) -> np.ndarray:
    """`image_block_ids` [1, length] of a prefill whose i-th image block sits at `rows[i]`."""
    ids = np.zeros((1, length), dtype=np.int64)
    for block, block_rows in enumerate(rows, start=1):
        ids[0, block_rows] = block
    return ids


def chunk_extras(extras: Extras, start: int, end: int) -> dict[str, np.ndarray]:
    """A prefill's optional inputs for its tokens [start, end): DeepStack planes are per new token
    ([L, B, S, D]), image block ids cover the past too ([B, P + S])."""
    chunk = {}
    if "deepstack_embeds" in extras:
        chunk["deepstack_embeds"] = extras["deepstack_embeds"][:, :, start:end]
    if "image_block_ids" in extras:
        chunk["image_block_ids"] = extras["image_block_ids"][:, :end]
    return chunk


def stack_extras(rows: list[Extras]) -> dict[str, np.ndarray]:
    """The optional inputs of one-row chunks of equal length, as one call of all those rows: each
    along its batch axis (DeepStack planes [L, B, S, D]: 1; image block ids [B, P + S]: 0), zeros
    for a row that gives none (a prompt without images has no DeepStack planes)."""
    stacked = {}
    for name, axis in (("deepstack_embeds", 1), ("image_block_ids", 0)):
        given = next((row[name] for row in rows if name in row), None)
        if given is not None:
            stacked[name] = np.concatenate([row.get(name, np.zeros_like(given)) for row in rows], axis=axis)
    return stacked


def chunk_ends(block_ids: np.ndarray) -> np.ndarray:
    """Where a prefill chunk may end, given its bidirectional blocks' ids [S] (`image_block_ids`;
    zeros for a causal decoder): after any token but one followed by a token of its own block
    (a block's queries must see the whole block)."""
    inside = (block_ids[:-1] == block_ids[1:]) & (block_ids[1:] > 0)
    return np.append(np.flatnonzero(~inside) + 1, len(block_ids))

