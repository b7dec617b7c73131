"""Image loading limits and preprocessing parity with transformers' PIL image processor."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from zspa.errors import InvalidInputError
from zspa.runtime.images import load_image, preprocess


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
        image.save(buffer, format="TIFF" if image.mode in ("CMYK", "I;16") else "PNG")
        ours = preprocess(load_image(buffer.getvalue()), vision_spec)
        theirs = processor.image_processor(Image.open(io.BytesIO(buffer.getvalue())), return_tensors="np")
        theirs = theirs["pixel_values"]
        assert ours.shape == theirs.shape == (1, 3, 336, 336), name
        assert ours.dtype == np.float32
        np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0, err_msg=name)


def test_corrupt_bytes_are_refused():
    with pytest.raises(InvalidInputError, match="not a readable image"):
        load_image(b"definitely not an image")


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
