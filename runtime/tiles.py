"""InternVL's tiling in numpy + PIL, equal to transformers' `GotOcr2ImageProcessorPil` with
`crop_to_patches`: the image is resized onto the tile grid whose aspect ratio is closest to its
own (ties go to more tiles while they cover under twice the image's area), split row by row, and
followed by a thumbnail of the whole image when there is more than one tile.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image

from zspa.manifest import TileVisionSpec
from zspa.runtime.images import VisionInput, normalise


@functools.lru_cache(maxsize=16)
def _arrangements(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """(columns, rows) with min ≤ columns·rows ≤ max, fewest tiles first (a stable sort, as transformers)."""
    grids = [(columns, rows) for columns in range(1, max_tiles + 1) for rows in range(1, max_tiles + 1)
             if min_tiles <= columns * rows <= max_tiles]
    return tuple(sorted(grids, key=lambda grid: grid[0] * grid[1]))


def tile_grid(height: int, width: int, tile: tuple[int, int], min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """(columns, rows) of the canvas an image of `height` × `width` is resized onto."""
    aspect, area = width / height, width * height
    best_difference, best = math.inf, (1, 1)
    for columns, rows in _arrangements(min_tiles, max_tiles):
        difference = abs(aspect - columns / rows)
        if difference < best_difference:
            best_difference, best = difference, (columns, rows)
        elif difference == best_difference and area > 0.5 * tile[0] * tile[1] * columns * rows:
            best = (columns, rows)
    return best


def tile_pixels(image: Image.Image, spec: TileVisionSpec) -> np.ndarray:
    """RGB PIL image → uint8 tiles [T, H, W, 3]: the grid's tiles row by row, then any thumbnail."""
    tile_h, tile_w = spec.tile_size
    resample = Image.Resampling(spec.resample)
    columns, rows = (tile_grid(image.height, image.width, (tile_h, tile_w), spec.min_tiles, spec.max_tiles)
                     if spec.max_tiles > 1 else (1, 1))
    canvas = np.asarray(image.resize((tile_w * columns, tile_h * rows), resample=resample))
    tiles = canvas.reshape(rows, tile_h, columns, tile_w, 3).transpose(0, 2, 1, 3, 4).reshape(-1, tile_h, tile_w, 3)
    if spec.use_thumbnail and len(tiles) > 1:
        thumbnail = np.asarray(image.resize((tile_w, tile_h), resample=resample))
        tiles = np.concatenate([tiles, thumbnail[None]])
    return tiles


def prepare_tiles(image: Image.Image, spec: TileVisionSpec) -> VisionInput:
    """The vision graph's `pixel_values` [T, 3, H, W]; the token grid is (T, side, side), each
    tile's tokens row-major after the tower's pixel shuffle."""
    tiles = tile_pixels(image, spec)
    side = math.isqrt(spec.tokens_per_tile)
    pixel_values = np.stack([normalise(tile, spec) for tile in tiles])
    return VisionInput({"pixel_values": pixel_values}, (len(tiles), side, spec.tokens_per_tile // side), tiles)


def fewest_tiles(spec: TileVisionSpec) -> int:
    """The fewest tiles an image gives: one, or the smallest grid and its thumbnail."""
    if spec.max_tiles == 1 or spec.min_tiles == 1:
        return 1
    return spec.min_tiles + int(spec.use_thumbnail)


def most_tiles(spec: TileVisionSpec) -> int:
    return spec.max_tiles + int(spec.use_thumbnail and spec.max_tiles > 1)
