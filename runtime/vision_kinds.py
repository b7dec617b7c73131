"""The runtime half of a family, keyed by the manifest's `vision.kind`: the one place that knows
what a kind of preprocessing does. Nothing else in the runtime branches on the kind.

A kind prepares an RGB image into the vision graph's feeds, its token grid and the resized pixels
(`VisionInput`), says how many visual tokens an image can give and how many patches make one
(engine profiles, static-K pruners), which image the service warms up with, and which position
scheme its decoder takes: 1-D, or M-RoPE's (t, h, w) from the token grid (runtime/positions.py).
Its image block is one contiguous run of visual tokens where the prompt's placeholder was; an
image of several views (Gemma 3's pan&scan) is one block per view, each at its own placeholder.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from zspa.errors import BundleError
from zspa.manifest import ClipVisionSpec, DecoderSpec, PatchVisionSpec, VisionSpec
from zspa.runtime.images import VisionInput, clip_pixels, normalise
from zspa.runtime.qwen_vision import prepare_qwen
from zspa.runtime.tiles import fewest_tiles, prepare_tiles
from zspa.runtime.views import most_views, prepare_views


@dataclass(frozen=True)
class VisionKind:
    prepare: Callable[[Image.Image, VisionSpec], VisionInput]
    fixed_tokens: Callable[[VisionSpec], bool]  # every image gives `num_tokens` (a static vision graph)
    fewest_tokens: Callable[[VisionSpec], int]  # the fewest visual tokens an image can give
    patches_per_token: Callable[[VisionSpec], int]  # vision-graph rows per visual token
    warmup_size: Callable[[VisionSpec], tuple[int, int]]  # (height, width) of the warm-up image
    mrope: bool  # positions are M-RoPE's (t, h, w) over the token grid, not 1-D


def _prepare_clip(image: Image.Image, spec: ClipVisionSpec) -> VisionInput:
    side = math.isqrt(spec.num_tokens)
    grid = (1, side, side) if side * side == spec.num_tokens else (1, 1, spec.num_tokens)
    pixels = clip_pixels(image, spec)
    return VisionInput({"pixel_values": normalise(pixels, spec)[None]}, grid, pixels)


def _prepare_qwen(image: Image.Image, spec: PatchVisionSpec) -> VisionInput:
    return VisionInput(*prepare_qwen(image, spec))


# Qwen2-VL, Qwen2.5-VL (kind "qwen2_vl") and Qwen3-VL ("qwen3_vl", which adds the position table's
# taps): native resolution within [min_pixels, max_pixels], 2×2-merged patches, M-RoPE.
_QWEN = VisionKind(_prepare_qwen, fixed_tokens=lambda spec: False,
                   fewest_tokens=lambda spec: max(1, spec.min_pixels // (spec.patch_size * spec.merge_size) ** 2),
                   patches_per_token=lambda spec: spec.merge_size**2, warmup_size=lambda spec: (448, 448), mrope=True)

KINDS: dict[str, VisionKind] = {
    # LLaVA: resize the shortest edge, center-crop to the tower's square; 1-D positions.
    "clip": VisionKind(_prepare_clip, fixed_tokens=lambda spec: True, fewest_tokens=lambda spec: spec.num_tokens,
                       patches_per_token=lambda spec: 1,
                       warmup_size=lambda spec: (spec.image_size[0], spec.image_size[1]), mrope=False),
    "qwen2_vl": _QWEN,
    "qwen3_vl": _QWEN,
    # InternVL: 1–max tiles plus a thumbnail, a fixed number of tokens each; the vision graph takes
    # the tiles as its batch (engine profiles count tiles, not patches); 1-D positions.
    "internvl": VisionKind(prepare_tiles, fixed_tokens=lambda spec: False,
                           fewest_tokens=lambda spec: fewest_tiles(spec) * spec.tokens_per_tile,
                           patches_per_token=lambda spec: 1,
                           warmup_size=lambda spec: (spec.tile_size[0], 2 * spec.tile_size[1]), mrope=False),
    # Gemma 3: the image resized to the tower's square, plus its pan&scan crops where enabled, each
    # view its own block in the prompt; 1-D positions. Warmed up wide, so pan&scan runs too.
    "gemma3": VisionKind(prepare_views, fixed_tokens=lambda spec: most_views(spec) == 1,
                         fewest_tokens=lambda spec: spec.tokens_per_tile, patches_per_token=lambda spec: 1,
                         warmup_size=lambda spec: (spec.image_size[0], 2 * spec.image_size[1]), mrope=False),
}


def vision_kind(spec: VisionSpec) -> VisionKind:
    try:
        return KINDS[spec.kind]
    except KeyError:
        raise BundleError(f"manifest.json: unknown vision preprocessing kind {spec.kind!r}; upgrade zspa") from None


def check_kind(vision: VisionSpec, decoder: DecoderSpec) -> VisionKind:
    """The bundle's kind, refused where the manifest's decoder disagrees with its position scheme
    (the decoder graph's `position_ids` would have the wrong rank)."""
    kind = vision_kind(vision)
    if kind.mrope != decoder.mrope:
        raise BundleError(f"manifest.json: vision.kind {vision.kind!r} takes {'M-RoPE' if kind.mrope else '1-D'} "
                          f"positions, but decoder.mrope is {decoder.mrope}; re-export the bundle")
    return kind


def prepare_vision(image: Image.Image, spec: VisionSpec) -> VisionInput:
    """RGB image → the vision graph's feeds, by the manifest's preprocessing kind."""
    return vision_kind(spec).prepare(image, spec)
