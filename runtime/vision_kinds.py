"""The runtime half of a family, keyed by the manifest's `vision.kind`: the one place that knows
what a kind of preprocessing does. Nothing else in the runtime branches on the kind.

A kind prepares an RGB image into the vision graph's feeds, its token grid and the resized pixels
(`VisionInput`), says how many visual tokens an image can give (engine profiles, static-K
pruners) and which image the service warms up with.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from zspa.errors import BundleError
from zspa.manifest import VisionSpec
from zspa.runtime.images import VisionInput, clip_pixels, normalise
from zspa.runtime.qwen_vision import prepare_qwen


@dataclass(frozen=True)
class VisionKind:
    prepare: Callable[[Image.Image, VisionSpec], VisionInput]
    fixed_tokens: bool  # every image gives `num_tokens` (a static vision graph)
    fewest_tokens: Callable[[VisionSpec], int]  # the fewest visual tokens an image can give
    warmup_size: Callable[[VisionSpec], tuple[int, int]]  # (height, width) of the warm-up image


def _prepare_clip(image: Image.Image, spec: VisionSpec) -> VisionInput:
    side = math.isqrt(spec.num_tokens)
    grid = (1, side, side) if side * side == spec.num_tokens else (1, 1, spec.num_tokens)
    pixels = clip_pixels(image, spec)
    return VisionInput({"pixel_values": normalise(pixels, spec)[None]}, grid, pixels)


def _prepare_qwen(image: Image.Image, spec: VisionSpec) -> VisionInput:
    return VisionInput(*prepare_qwen(image, spec))


_QWEN = VisionKind(_prepare_qwen, fixed_tokens=False, fewest_tokens=lambda spec: max(
    1, spec.min_pixels // (spec.patch_size * spec.merge_size) ** 2), warmup_size=lambda spec: (448, 448))

KINDS: dict[str, VisionKind] = {
    # LLaVA: resize the shortest edge, center-crop to the tower's square.
    "clip": VisionKind(_prepare_clip, fixed_tokens=True, fewest_tokens=lambda spec: spec.num_tokens,
                       warmup_size=lambda spec: (spec.image_size[0], spec.image_size[1])),
    # Qwen2-VL, Qwen2.5-VL: native resolution within [min_pixels, max_pixels], 2×2-merged patches.
    "qwen2_vl": _QWEN,
    # Qwen3-VL: the same, and the taps into its learned position table (`position_grid`).
    "qwen3_vl": _QWEN,
}


def vision_kind(spec: VisionSpec) -> VisionKind:
    try:
        return KINDS[spec.kind]
    except KeyError:
        raise BundleError(f"manifest.json: unknown vision preprocessing kind {spec.kind!r}; upgrade zspa") from None


def prepare_vision(image: Image.Image, spec: VisionSpec) -> VisionInput:
    """RGB image → the vision graph's feeds, by the manifest's preprocessing kind."""
    return vision_kind(spec).prepare(image, spec)
