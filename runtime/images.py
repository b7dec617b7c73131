"""Image loading with limits, and preprocessing that matches transformers' PIL image processors.

`load_image`, `clip_pixels` and `normalise` reproduce CLIPImageProcessor's PIL path step for step:
RGB conversion compositing transparency on white, shortest-edge resize with the same output-size
arithmetic and PIL filter, center crop at floor offsets, rescale in float64 then float32, normalise
in float32. Each kind's whole preparation is in `runtime/vision_kinds.py`.

Memory per image is bounded by what is decoded, not by what a resize would make of it: a 98-byte
6000×1 PNG resized to a shortest edge of 336 is a 2-million-pixel-wide image (6.7 GB in PIL), so
past `FULL_RESIZE_PIXELS` only the region the crop keeps is resized, and aspect ratios past
`MAX_ASPECT_RATIO` are refused before decoding.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from zspa.errors import InvalidInputError
from zspa.manifest import ClipVisionSpec, VisionSpec

# Pixels, not bytes: a 50 MP photo is plausible, a 1 GP PNG of a few KB is a decompression bomb.
DEFAULT_MAX_PIXELS = 50_000_000
MAX_ASPECT_RATIO = 200  # Qwen2-VL's processor's own limit, applied to every family
# A shortest-edge resize up to this many pixels is done whole, bit-identical to transformers (every
# photo of a sane shape: 4032×3024 → 448×336); past it, only the cropped region is resized.
FULL_RESIZE_PIXELS = 4_000_000

ImageSource = str | Path | bytes | Image.Image
# The decoders input may reach: the formats OpenAI's API takes (PNG, JPEG, WebP, non-animated GIF).
# Pillow knows dozens more, some rarely hardened (TIFF, PSD, …) and EPS, which hands the data to
# Ghostscript where installed.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")


def load_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               formats: tuple[str, ...] = IMAGE_FORMATS) -> Image.Image:
    """Opens and fully decodes an image (path, bytes or PIL image) as RGB, refusing bad input and
    any encoded format outside `formats` (Pillow's names)."""
    if isinstance(source, Image.Image):
        image, name = source, "image"
    else:
        name = "image bytes" if isinstance(source, bytes) else str(source)
        data = io.BytesIO(source) if isinstance(source, bytes) else source
        try:
            image = Image.open(data, formats=list(formats))
        except FileNotFoundError:
            raise InvalidInputError(f"{name}: no such file") from None
        except UnidentifiedImageError:
            raise InvalidInputError(f"{name}: not a readable {_format_names(formats)} image") from None
        except Image.DecompressionBombError as exc:
            raise InvalidInputError(f"{name}: not a readable image ({exc})") from None
        except (OSError, SyntaxError, ValueError) as exc:  # a damaged header ("Truncated IHDR chunk", …)
            raise InvalidInputError(f"{name}: cannot read ({exc})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidInputError(f"{name}: {width}x{height} is over the {max_pixels:,}-pixel limit")
    if width < 1 or height < 1:
        raise InvalidInputError(f"{name}: empty image")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise InvalidInputError(f"{name}: {width}x{height} has an aspect ratio over {MAX_ASPECT_RATIO}:1")
    try:
        if getattr(image, "is_animated", False):  # which frame the model should see is the sender's choice
            raise InvalidInputError(f"{name}: an animated {image.format} ({image.n_frames} frames); "
                                    "send one still frame")
        image.load()
        return _to_rgb(image)
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data surfaces on decode
        raise InvalidInputError(f"{name}: corrupt or truncated image ({exc})") from None


def _format_names(formats: tuple[str, ...]) -> str:
    names = ["WebP" if f == "WEBP" else f for f in formats]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


_COMPOSITE_ROWS = 256  # transparency is composited a band of rows at a time


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, transparency composited on white as transformers' `convert_rgb` does; band by band,
    so a 50 MP RGBA image costs its RGB copy (3 bytes a pixel) and not four full-size buffers."""
    if "A" not in image.getbands() and image.info.get("transparency") is None:
        return image if image.mode == "RGB" else image.convert("RGB")  # RGB already: no copy
    rgb = Image.new("RGB", image.size)
    for top in range(0, image.height, _COMPOSITE_ROWS):
        band = image.crop((0, top, image.width, min(top + _COMPOSITE_ROWS, image.height)))
        if band.mode == "P":  # a palette's transparency travels in `info`, which crop keeps
            band.info = image.info
        composited = Image.new("RGBA", band.size, (255, 255, 255, 255))
        composited.alpha_composite(band.convert("RGBA"))
        rgb.paste(composited.convert("RGB"), (0, top))
    return rgb


def resized_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """transformers' `get_resize_output_image_size(default_to_square=False)`: truncates the long side."""
    if width <= height:
        return int(shortest_edge * height / width), shortest_edge
    return shortest_edge, int(shortest_edge * width / height)


def normalise(pixels: np.ndarray, spec: VisionSpec) -> np.ndarray:
    """uint8 [H, W, 3] → float32 [3, H, W], channels first, by table lookup: a pixel's value
    depends on its channel and byte only, so the 3 × 256 results, computed once the way
    transformers computes each pixel, are bit-identical to it at a fifth of the time."""
    table = _normalisation_table(spec.rescale_factor, tuple(spec.mean), tuple(spec.std))
    index = pixels.transpose(2, 0, 1).astype(np.intp, order="C")  # numpy's take is fastest on intp
    index += _CHANNEL_OFFSETS
    return np.take(table, index)


_CHANNEL_OFFSETS = (np.arange(3) * 256)[:, None, None]  # channel c's row in the flattened table


@functools.lru_cache(maxsize=8)
def _normalisation_table(rescale_factor: float, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """[3 × 256] float32, flat: rescale in float64 then float32, normalise in float32."""
    values = np.arange(256, dtype=np.float64)[:, None].repeat(3, axis=1)
    scaled = (values * rescale_factor).astype(np.float32)
    table = (scaled - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(table.T).ravel()


def clip_pixels(image: Image.Image, spec: ClipVisionSpec) -> np.ndarray:
    """RGB PIL image → the resized, center-cropped uint8 pixels [H, W, 3] (the "clip" kind)."""
    if spec.resize_shortest_edge is None:
        return _center_crop(np.asarray(image), spec)
    height, width = resized_size(image.height, image.width, spec.resize_shortest_edge)
    resample = Image.Resampling(spec.resample)
    if not spec.center_crop or height * width <= FULL_RESIZE_PIXELS:
        return _center_crop(np.asarray(image.resize((width, height), resample=resample)), spec)
    return np.asarray(_resize_cropped(image, (height, width), spec.image_size, resample))


def _resize_cropped(image: Image.Image, resized: tuple[int, int], crop: tuple[int, int],
                    resample: Image.Resampling) -> Image.Image:
    """The center crop of `image` resized to `resized`, computing only the cropped pixels: one pass
    per axis, horizontal first as PIL's full resize, each over the source span the crop maps to.
    The same filter taps as the full resize; a coefficient's float rounding can move a pixel by 1."""
    if resample == Image.Resampling.NEAREST:
        raise InvalidInputError(f"image of {image.width}x{image.height} would resize to {resized[1]}x{resized[0]}, "
                                f"over the {FULL_RESIZE_PIXELS:,}-pixel preprocessing bound")
    (height, width), (crop_h, crop_w) = resized, crop
    top, left = _crop_offsets(height, width, crop)
    x_scale, y_scale = image.width / width, image.height / height
    columns = image.resize((crop_w, image.height), resample=resample,
                           box=(left * x_scale, 0, (left + crop_w) * x_scale, image.height))
    return columns.resize((crop_w, crop_h), resample=resample,
                          box=(0, top * y_scale, crop_w, (top + crop_h) * y_scale))


def _center_crop(pixels: np.ndarray, spec: ClipVisionSpec) -> np.ndarray:
    if not spec.center_crop:
        return pixels
    crop_h, crop_w = spec.image_size
    top, left = _crop_offsets(pixels.shape[0], pixels.shape[1], spec.image_size)
    return pixels[top : top + crop_h, left : left + crop_w]


def _crop_offsets(height: int, width: int, crop: tuple[int, int]) -> tuple[int, int]:
    """(top, left) of a center crop at floor offsets, as transformers' `center_crop`."""
    top, left = (height - crop[0]) // 2, (width - crop[1]) // 2
    if top < 0 or left < 0:
        raise InvalidInputError(f"image of {width}x{height} is smaller than the crop")
    return top, left


@dataclass(frozen=True)
class VisionInput:
    """What the vision graph is fed for one image, and the grid of visual tokens it will return."""

    feeds: dict[str, np.ndarray]
    grid: tuple[int, int, int]  # (t, h, w) of the visual tokens, in the order the graph emits them
    pixels: np.ndarray  # the resized uint8 image [H, W, 3] the feeds are computed from, and from it alone
    views: int = 1  # blocks the image becomes in the prompt (Gemma 3's pan&scan: the image, then its crops)

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def nbytes(self) -> int:
        """What it holds in memory: the feeds and the pixels."""
        return sum(feed.nbytes for feed in self.feeds.values()) + self.pixels.nbytes
