"""The onnxruntime GPU backends on a real GPU; skipped, with the reason, where there is none."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from zspa.runtime.pipeline import Pipeline

from decode_step import check_decode_step

AVAILABLE = ort.get_available_providers()


def _needs(provider: str) -> None:
    if provider not in AVAILABLE:
        pytest.skip(f"needs onnxruntime-gpu with {provider} and a CUDA GPU (this onnxruntime has {AVAILABLE})")


@pytest.mark.parametrize("backend, provider", [("ort-cuda", "CUDAExecutionProvider"),
                                               ("ort-trt", "TensorrtExecutionProvider")])
def test_gpu_backend_matches_cpu(bundle_copy, photo_path, backend, provider):
    _needs(provider)
    cpu = Pipeline.load(bundle_copy).generate(photo_path, "What is this?", max_new_tokens=8)
    gpu_pipeline = Pipeline.load(bundle_copy, backend=backend)
    gpu = gpu_pipeline.generate(photo_path, "What is this?", max_new_tokens=8)
    assert gpu_pipeline.providers[0] == provider
    np.testing.assert_array_equal(gpu.kept_indices, cpu.kept_indices)
    np.testing.assert_allclose(gpu.first_token_logits, cpu.first_token_logits, atol=1e-3, rtol=1e-3)
    if backend == "ort-trt":
        assert any((bundle_copy / "engines" / "ort-trt").iterdir())  # engines cached for the next start
    check_decode_step(gpu_pipeline, Pipeline.load(bundle_copy), photo_path)


def test_ort_cuda_slot_cache_batches_rows_as_they_answer_alone(tmp_path, photo_path):
    """The shared-KV decoder's slot cache in CUDA memory: three rows of different lengths prefill
    into their slots and decode together; each row's tokens are its answer alone."""
    _needs("CUDAExecutionProvider")
    from zspa.export.exporter import ExportOptions, export_bundle
    from zspa.runtime.batching import decode_rows

    bundle = tmp_path / "shared"
    export_bundle(ExportOptions("tiny-random-llava", bundle, keeps=[0.1, 0.25], kv_cache="shared", progress=False))
    pipeline = Pipeline.load(bundle, backend="ort-cuda", max_context=1024)
    batch, rows, keeps = decode_rows(pipeline.decoder, 3), [], (0.1, 1.0, 0.25)
    for keep in keeps:
        slot = batch.prepare(pipeline.decoder)
        answer, logits = pipeline.prefill(pipeline.request(photo_path, "Hi", keep=keep, max_new_tokens=6,
                                                           ignore_eos=True))
        answer.accept(logits)
        batch.add(pipeline.decoder, slot)
        rows.append(answer)
    for _ in range(5):
        logits = batch.step([r.token for r in rows], pipeline.position_ids([r.position for r in rows]))
        for index, answer in enumerate(rows):
            answer.advance()
            answer.accept(logits[index])
    for keep, answer in zip(keeps, rows):
        alone = pipeline.generate(photo_path, "Hi", keep=keep, max_new_tokens=6, ignore_eos=True)
        assert answer.detokenizer.tokens == alone.token_ids
