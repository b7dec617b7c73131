"""Image loading with limits, and preprocessing that matches transformers' PIL image processors.

`preprocess` reproduces CLIPImageProcessor's PIL path step for step: RGB conversion compositing
transparency on white, shortest-edge resize with the same output-size arithmetic and PIL filter,
center crop at floor offsets, rescale in float64 then float32, normalise in float32.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from zspa.errors import InvalidInputError
from zspa.manifest import VisionSpec

# Pixels, not bytes: a 50 MP photo is plausible, a 1 GP PNG of a few KB is a decompression bomb.
DEFAULT_MAX_PIXELS = 50_000_000

ImageSource = str | Path | bytes | Image.Image


def load_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Opens and fully decodes an image (path, bytes or PIL image) as RGB, refusing bad input."""
    if isinstance(source, Image.Image):
        image, name = source, "image"
    else:
        name = "image bytes" if isinstance(source, bytes) else str(source)
        data = io.BytesIO(source) if isinstance(source, bytes) else source
        try:
            image = Image.open(data)
        except FileNotFoundError:
            raise InvalidInputError(f"{name}: no such file") from None
        except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
            raise InvalidInputError(f"{name}: not a readable image ({exc})") from None
        except OSError as exc:
            raise InvalidInputError(f"{name}: cannot read ({exc})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidInputError(f"{name}: {width}x{height} is over the {max_pixels:,}-pixel limit")
    if width < 1 or height < 1:
        raise InvalidInputError(f"{name}: empty image")
    try:
        image.load()
        return _to_rgb(image)
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data surfaces on decode
        raise InvalidInputError(f"{name}: corrupt or truncated image ({exc})") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resized_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """transformers' `get_resize_output_image_size(default_to_square=False)`: truncates the long side."""
    if width <= height:
        return int(shortest_edge * height / width), shortest_edge
    return shortest_edge, int(shortest_edge * width / height)


def preprocess(image: Image.Image, spec: VisionSpec) -> np.ndarray:
    """RGB PIL image → `pixel_values` float32 [1, 3, H, W]."""
    if spec.resize_shortest_edge is not None:
        height, width = resized_size(image.height, image.width, spec.resize_shortest_edge)
        image = image.resize((width, height), resample=Image.Resampling(spec.resample))
    pixels = np.asarray(image)
    if spec.center_crop:
        crop_h, crop_w = spec.image_size
        top = (pixels.shape[0] - crop_h) // 2
        left = (pixels.shape[1] - crop_w) // 2
        if top < 0 or left < 0:
            raise InvalidInputError(f"image of {pixels.shape[1]}x{pixels.shape[0]} is smaller than the crop")
        pixels = pixels[top : top + crop_h, left : left + crop_w]
    scaled = (pixels.astype(np.float64) * spec.rescale_factor).astype(np.float32)
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    normalised = (scaled - mean) / std
    return np.ascontiguousarray(normalised.transpose(2, 0, 1)[None])
