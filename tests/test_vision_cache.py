"""The vision-feature cache: LRU by bytes, keyed by the preprocessed pixels, invisible in answers."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from zspa.runtime.pipeline import Pipeline
from zspa.runtime.vision_cache import VisionCache


def _pixels(value: int, shape=(4, 4, 3), dtype=np.uint8):
    return np.full(shape, value, dtype=dtype)


def test_keys_follow_content_dtype_and_shape():
    assert VisionCache.key(_pixels(1)) == VisionCache.key(_pixels(1))
    others = [_pixels(2), _pixels(1, dtype=np.uint16), _pixels(1, shape=(2, 8, 3)),
              np.asfortranarray(_pixels(1, shape=(4, 5, 3)))]
    assert len({VisionCache.key(p) for p in [_pixels(1), *others]}) == 5
    pixels = np.arange(60, dtype=np.uint8).reshape(4, 5, 3)
    assert VisionCache.key(pixels[:, ::-1]) == VisionCache.key(np.ascontiguousarray(pixels[:, ::-1]))


def test_least_recently_used_entries_leave_first_and_size_stays_bounded():
    cache = VisionCache(max_bytes=3 * 400)
    arrays = {name: np.zeros(100, np.float32) for name in "abcd"}  # 400 bytes each
    for name in "abc":
        cache.put(name, arrays[name])
    assert cache.get("a") is arrays["a"]  # a is now the most recent
    cache.put("d", arrays["d"])
    assert cache.get("b") is None and len(cache) == 3 and cache.size_bytes == 1200
    assert cache.get("c") is not None and cache.get("d") is not None
    assert (cache.hits, cache.misses) == (3, 1)
    cache.put("huge", np.zeros(1000, np.float32))  # larger than the whole cache: not kept
    assert cache.get("huge") is None and len(cache) == 3
    with pytest.raises(ValueError):
        arrays["a"][0] = 1.0  # cached outputs are shared: read-only
    with pytest.raises(ValueError):
        VisionCache(0)


def test_a_second_question_about_the_same_image_skips_the_vision_graph(tiny_bundle, pipeline, photo_path):
    cached = Pipeline.load(tiny_bundle, vision_cache_bytes=64 * 1024 * 1024)
    first = cached.generate(photo_path, "What is this?", max_new_tokens=4)
    again = cached.generate(photo_path, "Where is it?", max_new_tokens=4)
    assert first.stats.vision_cache_hits == [False] and first.stats.timings_ms["vision"] > 0
    assert again.stats.vision_cache_hits == [True] and again.stats.timings_ms["vision"] == 0.0
    plain = pipeline.generate(photo_path, "Where is it?", max_new_tokens=4)
    assert again.token_ids == plain.token_ids and np.array_equal(again.kept_indices, plain.kept_indices)
    assert plain.stats.vision_cache_hits is None  # the shared pipeline has no cache
    other = Image.open(photo_path).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    assert cached.generate(other, "Where is it?", max_new_tokens=1).stats.vision_cache_hits == [False]
    assert (cached.vision_cache.hits, cached.vision_cache.misses) == (1, 2)


def test_the_cache_works_per_image(tiny_bundle, pipeline, photo_path):
    """A second request showing a seen image next to a new one runs the vision graph for the new
    one only, and answers as the uncached pipeline does."""
    cached = Pipeline.load(tiny_bundle, vision_cache_bytes=64 * 1024 * 1024)
    other = Image.open(photo_path).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    cached.generate(photo_path, "What is this?", max_new_tokens=1)
    both = cached.generate([other, photo_path], "Compare them.", keep=0.25, max_new_tokens=4)
    assert both.stats.vision_cache_hits == [False, True]
    plain = pipeline.generate([other, photo_path], "Compare them.", keep=0.25, max_new_tokens=4)
    assert both.token_ids == plain.token_ids and np.array_equal(both.kept_indices, plain.kept_indices)
