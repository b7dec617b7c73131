"""The static KV cache (--kv-cache static): TensorScatter + Attention at opset 24, the in-place form
TensorRT builds, checked on onnxruntime against transformers and the portable decoder."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from zspa.errors import BundleError
from zspa.runtime.backends import OrtBackend, OrtSharedKVDecoder
from zspa.runtime.bundle import Bundle
from zspa.runtime.engines import ShapeRanges, check_tensorrt_version, engine_sources, optimisation_profile
from zspa.runtime.pipeline import Pipeline


def test_decoder_is_tensor_scatter_and_attention_at_opset_24(static_bundle):
    manifest = Bundle.open(static_bundle).manifest
    assert manifest.decoder.kv_cache == "static" and manifest.opset == 18
    assert manifest.parity["logits_max_abs_diff"] < 1e-4  # through the runtime's session, against transformers
    decoder = onnx.load(str(static_bundle / "decoder.onnx"))
    assert {o.domain: o.version for o in decoder.opset_import}[""] == 24 and decoder.ir_version <= 11
    nodes = decoder.graph.node
    scatters = [n for n in nodes if n.op_type == "TensorScatter"]
    assert len(scatters) == 2 * manifest.decoder.num_layers  # one per cache tensor
    assert all(onnx.helper.get_attribute_value(a) == -2 for n in scatters for a in n.attribute if a.name == "axis")
    assert sum(n.op_type == "Attention" for n in nodes) == manifest.decoder.num_layers
    assert not [n for n in nodes if n.domain]  # nothing onnxruntime-only
    # TensorRT's importer takes neither past_key nor nonpad_kv_seqlen: K and V are the updated cache, plus a mask
    assert all(len(n.input) == 4 for n in nodes if n.op_type == "Attention")
    assert manifest.graphs["decoder"].inputs[3].shape[2] == "max_cache_length"
    assert {o.version for o in onnx.load(str(static_bundle / "vision.onnx")).opset_import if o.domain == ""} == {18}


def test_answers_equal_the_portable_decoder(static_bundle, tiny_bundle, photo_path):
    results = [Pipeline.load(bundle).generate(photo_path, "Describe the picture.", keep=0.1, max_new_tokens=32,
                                              ignore_eos=True) for bundle in (tiny_bundle, static_bundle)]
    assert results[0].token_ids == results[1].token_ids
    assert len(set(results[0].token_ids)) > 3  # an answer that varies, not one token repeated
    np.testing.assert_allclose(results[0].first_token_logits, results[1].first_token_logits, atol=1e-4)


def test_rows_feed_several_tokens_after_pasts_of_different_lengths(static_bundle):
    """What GroupQueryAttention refuses ("batch_size must be 1 when sequence_length > 1 and past
    context is given"): two rows at pasts of 5 and 9 each feed 3 tokens in one call, each writing at
    its own length; logits and written keys equal each row's call alone."""
    spec = Bundle.open(static_bundle).manifest.decoder
    path, backend, capacity = static_bundle / "decoder.onnx", OrtBackend(), 16
    embeds = np.random.default_rng(0).standard_normal((2, 12, 64), dtype=np.float32)
    pasts, alone, caches = (5, 9), [], []
    for row, past in enumerate(pasts):
        decoder = backend.decoder(path, spec, capacity)
        decoder.step(embeds[row:row + 1, :past], np.ones((1, past), np.int64), np.arange(past)[None])
        caches.append([buffer.numpy().copy() for buffer in decoder.buffers])  # the past, before the new tokens
        new = slice(past, past + 3)
        logits = decoder.step(embeds[row:row + 1, new], np.ones((1, past + 3), np.int64),
                              np.arange(past + 3)[None, new])
        alone.append((logits[0], [buffer.numpy()[:, :, new].copy() for buffer in decoder.buffers]))
    batch = [ort.OrtValue.ortvalue_from_numpy(np.concatenate(rows)) for rows in zip(*caches)]
    together = OrtSharedKVDecoder(backend.session(path), spec, "cpu", backend.transfers, capacity, allocate=False)
    together.bind_cache([value.data_ptr() for value in batch], 2, batch)
    mask = np.zeros((2, max(pasts) + 3), np.int64)
    for row, past in enumerate(pasts):
        mask[row, :past + 3] = 1
    together.past_length = max(pasts)
    logits = together.step(np.stack([embeds[row, past:past + 3] for row, past in enumerate(pasts)]), mask,
                           np.stack([np.arange(past, past + 3) for past in pasts]))
    for row, past in enumerate(pasts):
        np.testing.assert_allclose(logits[row], alone[row][0], rtol=0, atol=1e-4)
        for value, written in zip(batch, alone[row][1]):
            np.testing.assert_allclose(value.numpy()[row:row + 1, :, past:past + 3], written, rtol=0, atol=1e-5)


def test_zspa_build_gives_the_cache_one_fixed_shape(static_bundle):
    manifest = Bundle.open(static_bundle).manifest
    assert engine_sources(manifest, "fp16")["decoder"] == ("decoder", "fp16")
    profile = optimisation_profile(manifest.graphs["decoder"], ShapeRanges.for_manifest(manifest, max_context=512))
    assert profile["past_key_values.0.key"] == ((1, 2, 512, 16),) * 3  # min = opt = max: one shape per step
    assert profile["attention_mask"][0] == (1, 1) and profile["attention_mask"][2] == (1, 512)


@pytest.mark.parametrize("version, ok", [("10.3.0", False), ("10.14.1.48", False), ("10.15.0", True),
                                         ("11.0.0", True)])
def test_tensorrt_before_10_15_is_refused_before_building(static_bundle, tiny_bundle, version, ok):
    static, portable = (Bundle.open(b).manifest for b in (static_bundle, tiny_bundle))
    check_tensorrt_version(portable, version)  # the concat decoder builds on any TensorRT 10
    if ok:
        check_tensorrt_version(static, version)
    else:
        with pytest.raises(BundleError, match=f"needs TensorRT 10.15 or newer; this is {version}"):
            check_tensorrt_version(static, version)
