"""Image loading limits and preprocessing parity with transformers' PIL image processor."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from zspa.errors import InvalidInputError
from zspa.runtime.images import load_image, prepare_vision


@pytest.fixture(scope="module")
def vision_spec(tiny_bundle):
    from zspa.manifest import Manifest

    return Manifest.read(tiny_bundle / "manifest.json").vision


def _variants(photo: Image.Image):
    """Real photo content at several sizes, aspect ratios and PIL modes."""
    yield "original", photo
    yield "portrait-small", photo.resize((120, 301))
    yield "landscape-large", photo.resize((1333, 517))
    yield "tiny", photo.resize((17, 9))
    yield "square", photo.resize((336, 336))
    yield "L", photo.convert("L")
    yield "RGBA", photo.convert("RGBA")
    yield "LA", photo.convert("LA")
    yield "CMYK", photo.convert("CMYK")
    yield "P", photo.convert("P")
    yield "I;16", photo.convert("L").point(lambda v: v * 256).convert("I;16")
    half_transparent = photo.convert("RGBA")
    half_transparent.putalpha(Image.linear_gradient("L").resize(photo.size))
    yield "alpha-gradient", half_transparent


def test_preprocess_matches_transformers_pil_processor(tiny_hf, vision_spec, photo_path, rgba_png_path):
    _, processor = tiny_hf
    cases = list(_variants(Image.open(photo_path)))
    cases.append(("png-with-alpha", Image.open(rgba_png_path)))
    for name, image in cases:
        buffer = io.BytesIO()  # through encoded bytes, as the runtime receives images
        image.save(buffer, format="JPEG" if image.mode == "CMYK" else "PNG")
        ours = prepare_vision(load_image(buffer.getvalue()), vision_spec).feeds["pixel_values"]
        theirs = processor.image_processor(Image.open(io.BytesIO(buffer.getvalue())), return_tensors="np")
        theirs = theirs["pixel_values"]
        assert ours.shape == theirs.shape == (1, 3, 336, 336), name
        assert ours.dtype == np.float32
        np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0, err_msg=name)


def test_corrupt_bytes_are_refused():
    with pytest.raises(InvalidInputError, match="not a readable PNG, JPEG or WebP image"):
        load_image(b"definitely not an image")


@pytest.mark.parametrize("fmt", ["TIFF", "BMP", "GIF", "PPM", "ICO", "EPS", "PSD", "TGA"])
def test_formats_outside_png_jpeg_webp_are_refused(photo_path, fmt):
    image = Image.open(photo_path).convert("RGB").resize((32, 32))
    buffer = io.BytesIO()
    if fmt == "PSD":  # Pillow reads PSD but cannot write it: a minimal header is enough to be recognised
        buffer.write(b"8BPS\x00\x01" + b"\x00" * 6 + b"\x00\x03\x00\x00\x00\x20\x00\x00\x00\x20\x00\x08\x00\x03"
                     + b"\x00" * 12 + b"\x00\x00" + b"\x00" * 32 * 32 * 3)
    elif fmt == "EPS":  # the header alone: decoding would need Ghostscript, which must never be reached
        buffer.write(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\n")
    else:
        image.save(buffer, format=fmt)
    assert Image.open(io.BytesIO(buffer.getvalue())).format == fmt  # Pillow alone would open it
    with pytest.raises(InvalidInputError, match="not a readable PNG, JPEG or WebP image"):
        load_image(buffer.getvalue())


def test_declared_format_must_match_the_bytes(photo_path):
    jpeg = photo_path.read_bytes()
    assert load_image(jpeg, formats=("JPEG",)).size == Image.open(photo_path).size
    with pytest.raises(InvalidInputError, match="not a readable PNG image"):
        load_image(jpeg, formats=("PNG",))


def test_truncated_jpeg_is_refused(photo_path):
    data = photo_path.read_bytes()
    with pytest.raises(InvalidInputError, match="corrupt or truncated"):
        load_image(data[: len(data) // 2])


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(InvalidInputError, match="no such file"):
        load_image(tmp_path / "nope.jpg")


def test_pixel_limit_refuses_decompression_bombs():
    buffer = io.BytesIO()
    Image.new("L", (6000, 6000)).save(buffer, format="PNG")  # 36 MP in a few KB
    assert len(buffer.getvalue()) < 100_000
    with pytest.raises(InvalidInputError, match="over the 10,000,000-pixel limit"):
        load_image(buffer.getvalue(), max_pixels=10_000_000)
    assert load_image(buffer.getvalue(), max_pixels=40_000_000).size == (6000, 6000)


def test_normalise_by_table_is_bit_identical_to_per_pixel_arithmetic(vision_spec):
    from zspa.runtime.images import normalise

    pixels = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    pixels[0, :3] = [[0, 0, 0], [255, 255, 255], [1, 128, 254]]
    scaled = (pixels.astype(np.float64) * vision_spec.rescale_factor).astype(np.float32)
    expected = (scaled - np.asarray(vision_spec.mean, np.float32)) / np.asarray(vision_spec.std, np.float32)
    ours = normalise(pixels, vision_spec)
    assert ours.dtype == np.float32 and ours.flags.c_contiguous
    np.testing.assert_array_equal(ours, expected.transpose(2, 0, 1))


def test_rgb_png_with_a_transparent_colour_is_composited_on_white():
    image = Image.new("RGB", (4, 4), (10, 20, 30))
    image.putpixel((0, 0), (1, 2, 3))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", transparency=(1, 2, 3))
    loaded = load_image(buffer.getvalue())
    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == (255, 255, 255) and loaded.getpixel((1, 1)) == (10, 20, 30)
