"""Image loading limits and preprocessing parity with transformers' PIL image processor."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from zspa.errors import InvalidInputError
from zspa.runtime.images import load_image
from zspa.runtime.vision_kinds import prepare_vision


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
    with pytest.raises(InvalidInputError, match="not a readable PNG, JPEG, WebP or GIF image"):
        load_image(b"definitely not an image")


@pytest.mark.parametrize("fmt", ["TIFF", "BMP", "PPM", "ICO", "EPS", "PSD", "TGA"])
def test_formats_outside_openais_list_are_refused(photo_path, fmt):
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
    with pytest.raises(InvalidInputError, match="not a readable PNG, JPEG, WebP or GIF image"):
        load_image(buffer.getvalue())


def test_a_still_gif_decodes_with_its_transparency_on_white():
    """OpenAI takes non-animated GIFs; a palette image's transparent index is composited on white,
    as transformers' convert_rgb does."""
    image = Image.new("P", (8, 4))
    image.putpalette([200, 10, 30, 0, 0, 0] + [0] * 762)
    image.paste(1, (0, 0, 4, 4))  # the left half: index 1, declared transparent below
    buffer = io.BytesIO()
    image.save(buffer, format="GIF", transparency=1)
    rgb = np.asarray(load_image(buffer.getvalue()))
    assert rgb.shape == (4, 8, 3)
    assert (rgb[:, :4] == 255).all() and (rgb[:, 4:] == [200, 10, 30]).all()


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_images_are_refused(fmt):
    frames = [Image.new("RGB", (16, 16), colour) for colour in ("red", "blue", "green")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:], duration=100)
    with pytest.raises(InvalidInputError, match=f"an animated {fmt} \\(3 frames\\); send one still frame"):
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


def test_extreme_but_allowed_shapes_resize_only_the_crop_within_one_level(tiny_hf, vision_spec, photo_path):
    """150:1 and 1:150 images resize to 50,400×336, over FULL_RESIZE_PIXELS: only the crop is
    resized, and it matches transformers' whole-image resize to one level of 255."""
    from zspa.runtime.images import FULL_RESIZE_PIXELS

    _, processor = tiny_hf
    photo = Image.open(photo_path).convert("RGB")
    one_level = 1.0 / 255 / min(vision_spec.std) + 1e-6
    for size in ((3000, 20), (20, 3000)):
        image = photo.resize(size)
        assert 336 * 336 * 150 > FULL_RESIZE_PIXELS
        ours = prepare_vision(load_image(image), vision_spec).feeds["pixel_values"]
        theirs = processor.image_processor(image, return_tensors="np")["pixel_values"]
        difference = np.abs(ours - theirs)
        assert difference.max() <= one_level, size
        assert (difference > 1e-5).mean() < 0.01, size


@pytest.mark.parametrize("size, fmt", [  # WebP stops at 16,383 pixels a side
    *[(size, "PNG") for size in ((6000, 1), (1, 6000), (20000, 1), (200000, 1), (201, 1))],
    *[(size, "WEBP") for size in ((6000, 1), (1, 6000), (16383, 1), (201, 1))],
])
def test_aspect_ratios_past_200_to_1_are_refused_before_decoding(size, fmt):
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buffer, format=fmt)
    assert len(buffer.getvalue()) < 2000  # a few hundred bytes: the bomb is in the resize, not the file
    with pytest.raises(InvalidInputError, match=f"{size[0]}x{size[1]} has an aspect ratio over 200:1"):
        load_image(buffer.getvalue())


_PEAK_RSS = """
import json, resource, sys
from pathlib import Path
from PIL import Image
from zspa.errors import InvalidInputError
from zspa.manifest import Manifest
from zspa.runtime.images import load_image
from zspa.runtime.vision_kinds import prepare_vision
spec = Manifest.read(Path(sys.argv[1])).vision
prepare_vision(load_image(Image.new("RGB", (64, 48))), spec)  # numpy and PIL paths warmed
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
results = {}
for path in sys.argv[2:]:
    idle = peak()
    try:
        prepare_vision(load_image(Path(path).read_bytes()), spec)
        outcome = "answered"
    except InvalidInputError as exc:
        outcome = str(exc)
    results[Path(path).name] = [peak() - idle, outcome]
print(json.dumps(results))
"""


def test_hostile_images_stay_within_100_mb_of_idle(tiny_bundle, tmp_path):
    """Each in a fresh process, peak RSS over idle: refused, or answered at ≤ 100 MB. Before the
    crop-only resize a 6000×30 PNG (690 bytes) took 211 MB, and 6000×1 took 6.7 GB."""
    import json
    import subprocess
    import sys

    paths = []
    for width, height, fmt in [(6000, 1, "PNG"), (1, 6000, "WEBP"), (20000, 1, "PNG"), (200000, 1, "PNG"),
                               (16383, 1, "WEBP"),
                               (6000, 30, "PNG"), (30, 6000, "WEBP"), (6700, 34, "PNG")]:
        path = tmp_path / f"{width}x{height}.{fmt.lower()}"
        Image.new("RGB", (width, height), (200, 10, 10)).save(path, format=fmt)
        paths.append(path)
    for path in paths:
        run = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(tiny_bundle / "manifest.json"), str(path)],
                             capture_output=True, text=True, timeout=120, check=True)
        ((name, (peak_mb, outcome)),) = json.loads(run.stdout).items()
        assert peak_mb <= 100, (name, peak_mb)
        assert outcome == "answered" or "aspect ratio over 200:1" in outcome, (name, outcome)
        if min(int(n) for n in name.split(".")[0].split("x")) >= 30:
            assert outcome == "answered", name


def test_every_manifest_vision_kind_has_a_runtime_half():
    """The manifest's list of kinds and the runtime's registry are the same set: a kind added to one
    and not the other would pass the manifest check and then fail on the first image."""
    from zspa.manifest import VISION_SPECS
    from zspa.runtime.vision_kinds import KINDS

    assert set(KINDS) == set(VISION_SPECS)
