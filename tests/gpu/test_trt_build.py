"""zspa-build on a real GPU with TensorRT; skipped, with the reason, elsewhere."""

from __future__ import annotations

import pytest


def _gpu_or_skip():
    tensorrt = pytest.importorskip("tensorrt", reason="needs the tensorrt Python package and a CUDA GPU")
    from zspa.errors import ZspaError
    from zspa.runtime.cuda import cuda_device

    try:
        return tensorrt, cuda_device()
    except ZspaError as exc:
        pytest.skip(f"needs a CUDA GPU and cuda-python: {exc}")


def test_build_writes_engines_and_a_record_that_checks(bundle_copy):
    tensorrt, (gpu, capability) = _gpu_or_skip()
    from zspa.runtime.bundle import Bundle
    from zspa.runtime.engines import BuildRecord
    from zspa.runtime.trt_build import BuildOptions, build_engines

    target = build_engines(BuildOptions(bundle_copy, "fp16", max_context=1024, workspace_gb=1, progress=False))
    manifest = Bundle.open(bundle_copy).manifest
    assert {p.stem for p in target.glob("*.plan")} == set(manifest.graphs)
    BuildRecord.read(target).check(manifest, gpu, capability, tensorrt.__version__)
    runtime = tensorrt.Runtime(tensorrt.Logger(tensorrt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine((target / "decoder.plan").read_bytes())
    assert engine.get_tensor_profile_shape("past_key_values.0.key", 0)[2][2] == 1023


@pytest.mark.parametrize("prefix, context", [("tiny", 1024), ("qwen3", 1024), ("internvl", 4096), ("gemma3", 1024),
                                             ("static", 1024)])
def test_trt_backend_answers_like_onnxruntime(prefix, context, photo_path, tmp_path, request):
    """LLaVA; Qwen3-VL: dynamic patch counts, the fused vision attention expanded for the parser,
    DeepStack planes into the decoder engine; InternVL3: a vision engine over 13 tiles (3,328
    tokens, original positions past 3,328); Gemma 3: image_block_ids into the decoder engine;
    LLaVA with the static KV cache: TensorScatter + Attention (TensorRT ≥ 10.15), one cache shape."""
    _gpu_or_skip()
    import shutil

    import numpy as np

    from zspa.runtime.pipeline import Pipeline
    from zspa.runtime.trt_build import BuildOptions, build_engines

    bundle = tmp_path / "bundle"  # the fixture is built only once a GPU is known to be here
    shutil.copytree(request.getfixturevalue(f"{prefix}_bundle"), bundle)
    target = build_engines(BuildOptions(bundle, "fp32", max_context=context, workspace_gb=1, progress=False))
    if prefix == "static":
        import tensorrt

        runtime = tensorrt.Runtime(tensorrt.Logger(tensorrt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine((target / "decoder.plan").read_bytes())
        low, _, high = engine.get_tensor_profile_shape("past_key_values.0.key", 0)
        assert low[2] == high[2] == context  # every decode step binds the whole cache
    reference = Pipeline.load(bundle, max_context=context).generate(photo_path, "What is this?", max_new_tokens=8)
    trt_pipeline = Pipeline.load(bundle, backend="trt", max_context=context)
    result = trt_pipeline.generate(photo_path, "What is this?", max_new_tokens=8)
    assert trt_pipeline.providers[0].startswith("TensorRT")
    np.testing.assert_array_equal(result.kept_indices, reference.kept_indices)  # fp32 pruner engine
    np.testing.assert_allclose(result.first_token_logits, reference.first_token_logits, atol=1e-3, rtol=1e-3)
    from decode_step import check_decode_step

    check_decode_step(trt_pipeline, Pipeline.load(bundle, max_context=context), photo_path)
