"""The shared-buffer decoder (--kv-cache shared): GroupQueryAttention, same answers as the portable graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from zspa.errors import BundleError, InvalidInputError
from zspa.runtime.backends import OrtBackend
from zspa.runtime.engines import engine_sources
from zspa.runtime.pipeline import Pipeline


@pytest.fixture(scope="module")
def shared_bundle(tmp_path_factory):
    from zspa.export.exporter import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny-shared"
    export_bundle(ExportOptions("tiny-random-llava", out, keeps=[0.1], kv_cache="shared", progress=False))
    return out


def test_graph_uses_group_query_attention_and_passes_parity(shared_bundle):
    pipeline = Pipeline.load(shared_bundle)
    manifest = pipeline.bundle.manifest
    assert manifest.decoder.kv_cache == "shared"
    assert manifest.parity["logits_max_abs_diff"] < 1e-4  # against transformers' own attention
    graph = onnx.load(str(shared_bundle / "decoder.onnx")).graph
    attention = [n for n in graph.node if n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft"]
    assert len(attention) == manifest.decoder.num_layers
    assert pipeline.bundle.manifest.graphs["decoder"].inputs[3].shape[2] == "max_cache_length"


@pytest.mark.parametrize("keep", [0.1, 1.0])
@pytest.mark.parametrize("positions", ["original", "contiguous"])
def test_answers_equal_the_portable_decoder(shared_bundle, tiny_bundle, photo_path, keep, positions):
    results = [Pipeline.load(bundle, positions=positions).generate(
        photo_path, "Describe the picture.", keep=keep, max_new_tokens=48, ignore_eos=True)
        for bundle in (tiny_bundle, shared_bundle)]
    assert results[0].token_ids == results[1].token_ids
    np.testing.assert_allclose(results[0].first_token_logits, results[1].first_token_logits, atol=1e-4)


def test_buffers_are_written_in_place_and_bounded(shared_bundle, tiny_bundle):
    """After a prefill the shared buffers hold, in their first positions, the very keys and values
    the portable decoder returns as `present`; a step past the capacity is refused."""
    backend = OrtBackend()
    spec = Pipeline.load(shared_bundle).bundle.manifest.decoder
    shared = backend.decoder(shared_bundle / "decoder.onnx", spec, capacity=8)
    portable = backend.decoder(tiny_bundle / "decoder.onnx", Pipeline.load(tiny_bundle).bundle.manifest.decoder, 8)
    pointers = [b.data_ptr() for b in shared.buffers]
    embeds = np.random.default_rng(0).standard_normal((1, 6, 64), dtype=np.float32)
    for decoder in (shared, portable):
        decoder.step(embeds, np.ones((1, 6), np.int64), np.arange(6)[None])
    assert [b.data_ptr() for b in shared.buffers] == pointers
    for buffer, present in zip(shared.buffers, portable.past):
        np.testing.assert_allclose(buffer.numpy()[:, :, :6], present.numpy(), atol=1e-5)
    with pytest.raises(InvalidInputError, match="holds 8 positions"):
        shared.step(embeds[:, :3], np.ones((1, 9), np.int64), np.arange(6, 9)[None])


def test_tensorrt_build_refuses_the_shared_decoder(shared_bundle):
    with pytest.raises(BundleError, match="--kv-cache concat"):
        engine_sources(Pipeline.load(shared_bundle).bundle.manifest, "fp16")


def test_max_context_sizes_the_cache_and_bounds_requests(shared_bundle, photo_path):
    pipeline = Pipeline.load(shared_bundle, max_context=700)
    assert pipeline.decoder.capacity == 700
    result = pipeline.generate(photo_path, "Describe it.", keep=1.0, max_new_tokens=500, ignore_eos=True)
    # positions 0..prompt-1 prefilled, each answer token but the last fed back: the cache ends full
    assert result.finish_reason == "length" and result.stats.prompt_tokens + len(result.token_ids) - 1 == 700
    with pytest.raises(InvalidInputError, match="over the context of 300"):
        Pipeline.load(shared_bundle, max_context=300).generate(photo_path, "Describe it.", keep=1.0)
    for bad in (1, 4096):
        with pytest.raises(InvalidInputError, match="max_context"):
            Pipeline.load(shared_bundle, max_context=bad)
