"""The onnxruntime GPU backends on a real GPU; skipped, with the reason, where there is none."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from zspa.runtime.pipeline import Pipeline

from decode_step import check_decode_step

AVAILABLE = ort.get_available_providers()


@pytest.mark.parametrize("backend, provider", [("ort-cuda", "CUDAExecutionProvider"),
                                               ("ort-trt", "TensorrtExecutionProvider")])
def test_gpu_backend_matches_cpu(bundle_copy, photo_path, backend, provider):
    if provider not in AVAILABLE:
        pytest.skip(f"needs onnxruntime-gpu with {provider} and a CUDA GPU (this onnxruntime has {AVAILABLE})")
    cpu = Pipeline.load(bundle_copy).generate(photo_path, "What is this?", max_new_tokens=8)
    gpu_pipeline = Pipeline.load(bundle_copy, backend=backend)
    gpu = gpu_pipeline.generate(photo_path, "What is this?", max_new_tokens=8)
    assert gpu_pipeline.providers[0] == provider
    np.testing.assert_array_equal(gpu.kept_indices, cpu.kept_indices)
    np.testing.assert_allclose(gpu.first_token_logits, cpu.first_token_logits, atol=1e-3, rtol=1e-3)
    if backend == "ort-trt":
        assert any((bundle_copy / "engines" / "ort-trt").iterdir())  # engines cached for the next start
    check_decode_step(gpu_pipeline, Pipeline.load(bundle_copy), photo_path)
