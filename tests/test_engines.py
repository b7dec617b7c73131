"""zspa-build's decisions, on real manifests, without a GPU: profiles, precisions, sources, records."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest

from zspa.errors import BundleError, InvalidInputError, ZspaError
from zspa.runtime.bundle import Bundle
from zspa.runtime.engines import (
    BuildRecord,
    ShapeRanges,
    check_precision,
    engine_dir_name,
    engine_sources,
    optimisation_profile,
    strongly_typed,
)


@pytest.fixture(scope="module")
def manifest(tiny_bundle):
    return Bundle.open(tiny_bundle).manifest


def test_decoder_profile_spans_prefill_and_context(manifest):
    ranges = ShapeRanges.for_manifest(manifest, max_context=1024)
    profile = optimisation_profile(manifest.graphs["decoder"], ranges)
    low, opt, high = profile["inputs_embeds"]
    assert low == (1, 1, 64) and high == (1, ranges.max_prefill, 64) and low[1] <= opt[1] <= high[1]
    assert profile["past_key_values.1.value"][0] == (1, 2, 0, 16)  # prefill starts from an empty cache
    assert profile["past_key_values.1.value"][2] == (1, 2, 1023, 16)
    assert profile["attention_mask"][2] == (1, 1024)
    assert ranges.max_prefill == 1024  # 576 visual tokens + 512 of text, capped by the context


def test_vision_and_pruners_keep_llava_s_fixed_token_count(manifest):
    ranges = ShapeRanges.for_manifest(manifest)
    vision = optimisation_profile(manifest.graphs["vision"], ranges)
    assert vision["pixel_values"] == ((1, 3, 336, 336),) * 3
    pruner = optimisation_profile(manifest.graphs["pruner-zspa"], ranges)
    assert pruner["image_features"] == ((1, 576, 64),) * 3
    assert pruner["budget"] == ((1,),) * 3
    assert pruner["prompt_embeds"][0] == (1, 1, 64) and pruner["prompt_embeds"][2][1] == ranges.max_prefill


def test_context_beyond_the_model_is_refused(manifest):
    with pytest.raises(InvalidInputError, match="max-context"):
        ShapeRanges.for_manifest(manifest, max_context=manifest.text.max_context + 1)


@pytest.mark.parametrize("precision, capability, ok", [
    ("fp16", (8, 7), True), ("bf16", (7, 2), False), ("bf16", (8, 7), True), ("fp8", (8, 7), False),
    ("fp8", (9, 0), True), ("int8", (7, 2), True), ("int4", (7, 2), False), ("fp64", (9, 0), False),
])
def test_precisions_follow_the_gpu(precision, capability, ok):
    if ok:
        check_precision(precision, capability)
    else:
        with pytest.raises(InvalidInputError):
            check_precision(precision, capability)


def test_engine_sources_pick_precisions_and_trt_variants(manifest):
    sources = engine_sources(manifest, "fp16")
    assert sources["decoder"] == ("decoder", "fp16") and sources["pruner-zspa"] == ("pruner-zspa", "fp32")
    assert engine_sources(manifest, "int8")["vision"] == ("vision", "fp16")  # no Q/DQ graph: fp16
    graphs = dict(manifest.graphs)
    graphs["vision-trt-int8"] = dataclasses.replace(graphs["vision"], file="vision-trt-int8.onnx",
                                                    quantization={"precision": "int8", "method": "NVIDIA ModelOpt"})
    graphs["vision"] = dataclasses.replace(graphs["vision"], quantization={"precision": "int8",
                                                                           "method": "onnxruntime static QDQ"})
    calibrated = dataclasses.replace(manifest, graphs=graphs)
    sources = engine_sources(calibrated, "int8")
    assert sources["vision"] == ("vision-trt-int8", "int8") and "vision-trt-int8" not in sources
    assert strongly_typed(graphs["vision-trt-int8"]) and not strongly_typed(graphs["decoder"])
    with pytest.raises(BundleError, match="quantized for onnxruntime"):
        engine_sources(calibrated, "fp16")


def test_engine_folder_names_the_device_and_version():
    assert engine_dir_name("NVIDIA Jetson AGX Orin", (8, 7), "10.3.0") == "nvidia-jetson-agx-orin-sm87-trt10.3.0"


def test_build_record_refuses_other_gpus_versions_and_graphs(manifest, tmp_path):
    graphs = {name: spec.sha256 for name, spec in manifest.graphs.items()}
    record = BuildRecord("10.3.0", "Orin", [8, 7], "fp16", 2048, 1088, 2**32, graphs)
    record.write(tmp_path)
    loaded = BuildRecord.read(tmp_path)
    loaded.check(manifest, "Orin", (8, 7), "10.3.0")
    for gpu, capability, version, expected in [("H100", (9, 0), "10.3.0", "built for Orin"),
                                               ("Orin", (8, 7), "10.7.0", "TensorRT 10.3.0")]:
        with pytest.raises(BundleError, match=expected):
            loaded.check(manifest, gpu, capability, version)
    stale = dataclasses.replace(loaded, graphs={**graphs, "decoder": "0" * 64})
    with pytest.raises(BundleError, match="decoder"):
        stale.check(manifest, "Orin", (8, 7), "10.3.0")
    (tmp_path / "build.json").write_text("{", encoding="utf-8")
    with pytest.raises(BundleError, match="rebuild"):
        BuildRecord.read(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                    reason="TensorRT is installed: this checks the message given without it")
def test_zspa_build_without_tensorrt_says_what_to_install(tiny_bundle, capsys):
    from zspa.cli.build import main

    assert main([str(tiny_bundle)]) == ZspaError.exit_code
    assert "needs TensorRT" in capsys.readouterr().err  # and what to install


@pytest.mark.parametrize("prefix, fused_blocks", [("qwen", 2), ("qwen2", 4), ("qwen3", 4), ("internvl", 2)])
def test_tensorrt_gets_the_fused_vision_attention_as_the_pattern_it_fuses(prefix, fused_blocks, request):
    """The Qwen vision graphs attend over whole images through onnxruntime's MultiHeadAttention
    (one node per full-attention block), InternVL's over each of three tiles (a batch of them);
    zspa-build hands TensorRT's parser the same graph with each node expanded into standard
    operators, which computes the same features."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from zspa.runtime.qwen_vision import vision_indices
    from zspa.runtime.trt_build import expand_for_tensorrt

    bundle = Bundle.open(request.getfixturevalue(f"{prefix}_bundle"))
    path, spec = bundle.graph_file("vision"), bundle.manifest.vision
    model = onnx.load(str(path))
    assert sum(node.op_type == "MultiHeadAttention" for node in model.graph.node) == fused_blocks
    assert expand_for_tensorrt(model) == fused_blocks
    assert not [node for node in model.graph.node if node.domain not in ("", "ai.onnx")]
    grid_h, grid_w = 12, 20
    rng = np.random.default_rng(0)
    if prefix == "internvl":
        feeds = {"pixel_values": rng.standard_normal((3, 3, *spec.tile_size), dtype=np.float32)}
    else:
        feeds = {"pixel_values": rng.standard_normal((grid_h * grid_w, 3 * 2 * spec.patch_size**2), dtype=np.float32),
                 **vision_indices(grid_h, grid_w, 2, spec.window_size, spec.patch_size, spec.position_grid)}
    fused = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    expanded = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    for ours, theirs in zip(expanded, fused, strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-5 * float(np.abs(theirs).max()), rtol=0)


def _engine_folder(path, marker: str):
    path.mkdir()
    (path / "build.json").write_text(marker)
    for name in ("vision", "decoder"):
        (path / f"{name}.plan").write_text(f"{marker} {name}")


def test_engine_folders_are_published_whole_by_concurrent_builds(tmp_path):
    """zspa-build's publication: each build stages in a folder of its own and swaps it in, so two
    at once never mix files; the target is one build's folder, whole; and only an engine folder
    (plans and their record) is ever replaced."""
    import threading

    from zspa.runtime.staging import engine_folder, staged_directory

    target = tmp_path / "engines" / "gpu-sm87-trt10.3"
    target.parent.mkdir()
    _engine_folder(target, "old")
    staged, both_staged = [], threading.Barrier(2)

    def build(marker: str) -> None:
        with staged_directory(target, force=True, replaceable=engine_folder) as staging:
            staged.append(staging)
            both_staged.wait(timeout=10)  # both are writing at once
            (staging / "build.json").write_text(marker)
            for name in ("vision", "decoder"):
                (staging / f"{name}.plan").write_text(f"{marker} {name}")

    threads = [threading.Thread(target=build, args=(marker,)) for marker in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(staged)) == 2
    marker = (target / "build.json").read_text()
    assert marker in ("a", "b")
    assert sorted(p.read_text() for p in target.glob("*.plan")) == [f"{marker} decoder", f"{marker} vision"]
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no staging left behind
    (target / "notes.txt").write_text("mine")
    with pytest.raises(InvalidInputError, match="not a zspa-build engine folder"):
        with staged_directory(target, force=True, replaceable=engine_folder):
            pass
    assert (target / "notes.txt").read_text() == "mine"


def test_timing_cache_is_replaced_atomically(tmp_path):
    from zspa.runtime.staging import write_atomically

    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old")
    write_atomically(cache, b"new cache")
    assert cache.read_bytes() == b"new cache" and [p.name for p in tmp_path.iterdir()] == ["timing.cache"]
