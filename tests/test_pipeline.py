"""Pipeline behaviour: streaming, stops, budgets, stats and refusal of bad requests."""

from __future__ import annotations

import numpy as np
import pytest

from zspa.errors import InvalidInputError

Q = "What is in the picture?"


def test_stream_deltas_concatenate_to_the_result(pipeline, photo_path):
    stream = pipeline.generate(photo_path, Q, max_new_tokens=10, stream=True)
    deltas = list(stream)
    assert "".join(deltas) == stream.result.text
    plain = pipeline.generate(photo_path, Q, max_new_tokens=10)
    assert plain.token_ids == stream.result.token_ids


def test_max_new_tokens_and_stats(pipeline, photo_path):
    result = pipeline.generate(photo_path, Q, keep=0.1, max_new_tokens=5)
    stats = result.stats
    assert result.finish_reason == "length" and len(result.token_ids) == 5 == stats.tokens_generated
    assert (stats.visual_tokens_total, stats.visual_tokens_kept) == (576, 58)
    assert stats.prompt_tokens == len(pipeline.prompts.build(Q).input_ids) - 1 + 58
    assert all(stats.timings_ms[s] > 0 for s in ("preprocess", "vision", "prune", "prefill", "decode"))
    assert stats.time_to_first_token_ms >= sum(stats.timings_ms[s] for s in ("vision", "prune", "prefill"))
    assert stats.decode_tokens_per_s > 0


def test_default_keep_is_the_bundles_first_pruner(pipeline, photo_path):
    assert pipeline.generate(photo_path, Q, max_new_tokens=1).stats.visual_tokens_kept == 58


def test_stop_string_truncates_the_answer(pipeline, photo_path):
    full = pipeline.generate(photo_path, Q, max_new_tokens=12).text
    stop = full[3:5]
    assert stop.strip(), "the tiny model's answer should have text to stop on"
    result = pipeline.generate(photo_path, Q, max_new_tokens=12, stop=[stop])
    assert result.finish_reason == "stop"
    assert result.text == full[: full.find(stop)]
    streamed = pipeline.generate(photo_path, Q, max_new_tokens=12, stop=[stop], stream=True)
    assert "".join(streamed) == result.text


def test_the_seed_decides_the_sample(pipeline, photo_path):
    """Same seed, same tokens; other seeds, other tokens (so a seed that were ignored, or a fixed
    generator, fails here)."""
    def sample(seed):
        return pipeline.generate(photo_path, Q, max_new_tokens=8, temperature=1.0, seed=seed).token_ids

    assert sample(3) == sample(3)
    assert len({tuple(sample(seed)) for seed in range(6)}) >= 3
    assert len({tuple(sample(None)) for _ in range(4)}) >= 2  # unseeded: fresh entropy each time


def test_any_keep_runs_without_re_export(pipeline, photo_path):
    """The bundle was exported at 0.1 and 0.25; the per-request pruner runs 0.3 with K = round(0.3·576)."""
    result = pipeline.generate(photo_path, Q, keep=0.3, max_new_tokens=1)
    assert result.stats.visual_tokens_kept == len(result.kept_indices) == 173


def test_kept_indices_are_ascending_and_budgeted(pipeline, photo_path):
    idx = pipeline.generate(photo_path, Q, keep=0.25, max_new_tokens=1).kept_indices
    assert len(idx) == 144 and (np.diff(idx) > 0).all()


@pytest.mark.parametrize("keep, message", [(0.0, r"keep must be in \(0, 1\]"), (-0.1, "keep must be"),
                                           (1.5, "keep must be")])
def test_bad_keep_is_refused(pipeline, photo_path, keep, message):
    with pytest.raises(InvalidInputError, match=message):
        pipeline.generate(photo_path, Q, keep=keep)


def test_prompt_beyond_context_is_refused(pipeline, photo_path):
    with pytest.raises(InvalidInputError, match="over the context of 2048"):
        pipeline.generate(photo_path, "word " * 3000, keep=0.1)


def test_pipeline_stays_healthy_after_errors(pipeline, photo_path):
    with pytest.raises(InvalidInputError):
        pipeline.generate(b"garbage", Q)
    assert pipeline.generate(photo_path, Q, max_new_tokens=2).stats.tokens_generated == 2


def test_bad_image_fails_the_call_even_when_streaming(pipeline):
    with pytest.raises(InvalidInputError, match="not a readable PNG, JPEG, WebP or GIF image"):
        pipeline.generate(b"garbage", Q, stream=True)


def test_an_encoded_request_prefills_without_the_vision_stage(pipeline, photo_path, monkeypatch):
    """`encode` (vision, embed, prune; the service runs it in the request's thread) leaves the
    decoding worker only the splice and the prefill, with the same answer; the encoded request
    holds kept tokens, not the preprocessed image."""
    request = pipeline.request(photo_path, "What is in the picture?", keep=0.1, max_new_tokens=6)
    expected, expected_logits = pipeline.prefill(request)
    encoded = pipeline.encode(request)
    assert encoded.encoded is not None and pipeline.encode(encoded) is encoded
    assert encoded.image_bytes < request.image_bytes and not encoded.images[0].image.vision_input.feeds

    def no_vision(feeds):
        raise AssertionError("the vision graph ran after encode")

    monkeypatch.setattr(pipeline.vision, "run", no_vision)
    ours, logits = pipeline.prefill(encoded)
    np.testing.assert_array_equal(logits, expected_logits)
    np.testing.assert_array_equal(ours.kept_indices, expected.kept_indices)
    assert ours.stats.timings_ms["vision"] == encoded.encoded.stats.timings_ms["vision"] > 0


def test_image_memory_trades_images_for_kept_tokens():
    import asyncio

    from zspa.runtime.server.image_memory import ImageMemory
    from zspa.runtime.server.scheduler import Job

    memory = ImageMemory(100)
    assert memory.reserve(80) and memory.exchange(80, 10) and memory.used_bytes == 10
    assert not memory.exchange(10, 120) and memory.used_bytes == 10  # growing past the bound: refused, held kept
    assert memory.exchange(10, 90) and memory.used_bytes == 90

    class Held:
        def __init__(self, size):
            self.image_bytes = size

    loop = asyncio.new_event_loop()
    try:
        job = Job(Held(90), 0.1, "zspa", False, loop, memory=memory)
        job.drop_images()  # its client left during the vision stage
        assert job.swap_request(Held(5)) and job.request is None and memory.used_bytes == 0
    finally:
        loop.close()
