"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision input without torch: smart resize, patchify, and the index
tensors the vision graph takes (rotary positions; window order and boundaries; Qwen3-VL's taps into
its learned position table).

Equal to transformers' `Qwen2VLImageProcessorPil` (resize, rescale, normalise, patchify) and to
its `vision_utils` helpers, which compute these indices with Python loops the exporter cannot
trace; the runtime computes them per image, as `transformers.vision_utils` lets a caller precompute.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from zspa.errors import InvalidInputError
from zspa.manifest import PatchVisionSpec
from zspa.runtime.images import MAX_ASPECT_RATIO


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Sides divisible by `factor`, area within [min_pixels, max_pixels], aspect kept (transformers' rule)."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise InvalidInputError(f"image of {width}x{height}: the aspect ratio must be at most {MAX_ASPECT_RATIO}:1")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(pixels: np.ndarray, spec: PatchVisionSpec) -> np.ndarray:
    """[3, H, W] → [num_patches, 3·T·P·P] in merge-block order, the frame repeated T times."""
    channels, height, width = pixels.shape
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    grid_h, grid_w = height // p, width // p
    patches = pixels.reshape(channels, grid_h // m, m, p, grid_w // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], t, p, p))
    return np.ascontiguousarray(patches.reshape(grid_h * grid_w, channels * t * p * p), dtype=np.float32)


def rotary_positions(grid_h: int, grid_w: int, merge: int) -> np.ndarray:
    """int64 [grid_h·grid_w, 2]: each patch's (row, column), laid out block-major over merge blocks."""
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    shape = (grid_h // merge, merge, grid_w // merge, merge)
    rows = rows.reshape(shape).transpose(0, 2, 1, 3).ravel()
    cols = cols.reshape(shape).transpose(0, 2, 1, 3).ravel()
    return np.stack([rows, cols], axis=-1).astype(np.int64)


def window_order(grid_h: int, grid_w: int, merge: int, window_size: int, patch_size: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2.5-VL window attention: the order of merged tokens window by window (int64 [N]) and the
    windows' cumulative patch boundaries (int64 [W + 1]), as transformers' `get_vision_window_index`."""
    side = window_size // merge // patch_size
    llm_h, llm_w = grid_h // merge, grid_w // merge
    pad_h, pad_w = side - llm_h % side, side - llm_w % side
    windows_h, windows_w = (llm_h + pad_h) // side, (llm_w + pad_w) // side
    index = np.full((llm_h + pad_h, llm_w + pad_w), -1, dtype=np.int64)
    index[:llm_h, :llm_w] = np.arange(llm_h * llm_w).reshape(llm_h, llm_w)
    index = index.reshape(windows_h, side, windows_w, side).transpose(0, 2, 1, 3).reshape(-1, side * side)
    sizes = (index >= 0).sum(axis=1)
    order = index[index >= 0]
    bounds = np.concatenate([[0], np.cumsum(sizes) * merge * merge])
    return order, np.unique(bounds)  # empty windows repeat a boundary; transformers drops them too


def window_slots(bounds: np.ndarray, window_patches: int) -> tuple[np.ndarray, np.ndarray]:
    """Window attention as a batch of equal windows: `slots` int64 [W, window_patches] holds each
    window's patches (positions in window order, -1 where an edge window is short) and `positions`
    int64 [P] the flat slot of every patch, to gather the result back."""
    sizes = np.diff(bounds)
    slots = np.full((len(sizes), window_patches), -1, dtype=np.int64)
    positions = np.empty(int(bounds[-1]), dtype=np.int64)
    for window, (start, size) in enumerate(zip(bounds[:-1], sizes)):
        slots[window, :size] = np.arange(start, start + size)
        positions[start : start + size] = window * window_patches + np.arange(size)
    return slots, positions


def position_taps(grid_h: int, grid_w: int, merge: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Qwen3-VL's learned `side`×`side` position table resampled to the patch grid: bilinear with
    aligned corners, per patch in merge-block order, as int64 indices and float32 weights [P, 4]
    into the flattened table (transformers' `get_vision_interpolation_indices_and_weights`; float32
    arithmetic in its order, so the weights are bit-identical)."""
    rows, cols = rotary_positions(grid_h, grid_w, merge).T

    def axis(index: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        source = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
        floor = np.floor(source)
        offsets = np.arange(2, dtype=np.float32)
        taps = np.clip(floor.astype(np.int64)[:, None] + np.arange(2), 0, side - 1)
        weights = np.maximum(np.float32(1) - np.abs(source[:, None] - floor[:, None] - offsets), np.float32(0))
        return taps, weights

    (row_taps, row_weights), (col_taps, col_weights) = axis(rows, grid_h), axis(cols, grid_w)
    indices = (row_taps[:, :, None] * side + col_taps[:, None, :]).reshape(-1, 4)
    weights = (row_weights[:, :, None] * col_weights[:, None, :]).reshape(-1, 4)
    return indices, weights


def prepare_qwen(image: Image.Image, spec: PatchVisionSpec
                 ) -> tuple[dict[str, np.ndarray], tuple[int, int, int], np.ndarray]:
    """RGB image → the vision graph's feeds, the merged token grid (t, h, w) and the resized
    uint8 pixels the feeds come from."""
    from zspa.runtime.images import normalise

    factor = spec.patch_size * spec.merge_size
    height, width = smart_resize(image.height, image.width, factor, spec.min_pixels, spec.max_pixels)
    resized = image.resize((width, height), resample=Image.Resampling(spec.resample))
    pixels = np.asarray(resized)
    grid_h, grid_w = height // spec.patch_size, width // spec.patch_size
    feeds = {"pixel_values": patchify(normalise(pixels, spec), spec),
             **vision_indices(grid_h, grid_w, spec.merge_size, spec.window_size, spec.patch_size, spec.position_grid)}
    return feeds, (1, grid_h // spec.merge_size, grid_w // spec.merge_size), pixels


def vision_indices(grid_h: int, grid_w: int, merge: int, window_size: int, patch_size: int,
                   position_grid: int = 0) -> dict[str, np.ndarray]:
    """The vision graph's index inputs for a grid of patches (DESIGN §4); without windows
    (`window_size` 0: Qwen2-VL, Qwen3-VL) the rotary positions, and with a learned position table
    (`position_grid` > 0: Qwen3-VL) its interpolation taps."""
    if position_grid:
        indices, weights = position_taps(grid_h, grid_w, merge, position_grid)
        return {"vision_position_ids": rotary_positions(grid_h, grid_w, merge),
                "position_embed_indices": indices, "position_embed_weights": weights}
    if not window_size:
        return {"vision_position_ids": rotary_positions(grid_h, grid_w, merge)}
    order, bounds = window_order(grid_h, grid_w, merge, window_size, patch_size)
    slots, positions = window_slots(bounds, (window_size // patch_size) ** 2)
    return {"vision_position_ids": rotary_positions(grid_h, grid_w, merge), "window_index": order,
            "window_slots": slots, "window_positions": positions}
