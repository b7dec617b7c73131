"""Gemma 3's views of an image: the whole image, and with pan&scan its crops (the "gemma3" kind).

Each view is resized to the tower's square and gives a fixed number of tokens; in the prompt every
view is a block of its own ("Here is the original image … and here are some crops …"), so an
image's views decide its prompt text (`VisionInput.views`). The crops are `Gemma3ImageProcessorPil`'s
`pan_and_scan`: only an image whose long side is at least `min_ratio` times its short side is
cut, along the long side, into round(ratio) crops (2 to `max_crops`, none narrower than
`min_crop_size`), at ceil(side / crops) px steps.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from zspa.manifest import ViewVisionSpec
from zspa.runtime.images import VisionInput, normalise


def crop_boxes(width: int, height: int, spec: ViewVisionSpec) -> list[tuple[int, int, int, int]]:
    """(left, top, right, bottom) of each pan&scan crop, row by row; [] when the image is not cut."""
    if not spec.pan_and_scan:
        return []
    long_side, short_side = max(width, height), min(width, height)
    if long_side / short_side < spec.min_ratio:
        return []
    crops = min(int(math.floor(long_side / short_side + 0.5)), int(math.floor(long_side / spec.min_crop_size)))
    crops = min(spec.max_crops, max(2, crops))
    across, down = (crops, 1) if width >= height else (1, crops)
    crop_w, crop_h = math.ceil(width / across), math.ceil(height / down)
    if min(crop_w, crop_h) < spec.min_crop_size:
        return []
    return [(x * crop_w, y * crop_h, min(width, (x + 1) * crop_w), min(height, (y + 1) * crop_h))
            for y in range(down) for x in range(across)]


def prepare_views(image: Image.Image, spec: ViewVisionSpec) -> VisionInput:
    """The views' pixel_values [V, 3, H, W] (the whole image first) and their token grid (1, 1, V·T)."""
    height, width = spec.image_size
    resample = Image.Resampling(spec.resample)
    views = [image, *(image.crop(box) for box in crop_boxes(image.width, image.height, spec))]
    pixels = np.stack([np.asarray(view.resize((width, height), resample=resample)) for view in views])
    feeds = {"pixel_values": np.stack([normalise(view, spec) for view in pixels])}
    return VisionInput(feeds, (1, 1, len(views) * spec.tokens_per_tile), pixels, views=len(views))


def most_views(spec: ViewVisionSpec) -> int:
    """The most views an image can give: the whole image and, with pan&scan, its most crops."""
    return 1 + spec.max_crops if spec.pan_and_scan else 1
