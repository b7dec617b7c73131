"""Export entry points: local save_pretrained directories and the offline hub path."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import pytest

from zspa.manifest import Manifest
from zspa.pruning import METHOD_DEFAULTS
from zspa.pruning.onnx_pruner import build_pruner


def test_export_from_local_directory(tiny_hf, tmp_path, photo_path):
    """The real loading path: a directory written by save_pretrained, with options recorded."""
    from zspa.export.exporter import ExportOptions, export_bundle
    from zspa.runtime.pipeline import Pipeline

    model, processor = tiny_hf
    source = tmp_path / "saved"
    model.save_pretrained(source)
    processor.save_pretrained(source)
    out = tmp_path / "bundle"
    export_bundle(ExportOptions(str(source), out, keeps=[], keep_tokens=[30], relevance_ratio=1.0, pooling="max",
                                progress=False))
    manifest = Manifest.read(out / "manifest.json")
    assert manifest.source.model_id == str(source.resolve()) and not manifest.source.random_weights
    (pruner,) = manifest.pruners
    assert pruner.params == {"relevance_ratio": 1.0, "pooling": "max"}
    assert pruner.keep == 30 / 576  # the budget the export was asked for, run per request
    result = Pipeline.load(out).generate(photo_path, "What is it?", keep=pruner.keep, max_new_tokens=3)
    assert result.stats.visual_tokens_kept == 30


def _export_hub_id(env_changes, tmp_path):
    env = {**os.environ, **env_changes}
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "zspa.cli.export", "--model", "llava", "-o", str(tmp_path / "b")],
                         capture_output=True, text=True, env=env, timeout=120)
    return out, time.perf_counter() - started


@pytest.mark.parametrize("env", [
    {"HF_HUB_OFFLINE": "1"},
    # an endpoint that refuses connections: the network-failure path, without touching the network
    {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": "/nonexistent-zspa-hf-home"},
])
def test_hub_id_offline_fails_fast_with_a_way_out(tmp_path, env):
    out, seconds = _export_hub_id(env, tmp_path)
    assert out.returncode == 4, out.stderr
    assert "llava-hf/llava-1.5-7b-hf" in out.stderr and "--model DIR" in out.stderr
    assert "Traceback" not in out.stderr
    assert seconds < 30
    assert not (tmp_path / "b").exists()


def test_unknown_model_names_are_explained(tmp_path):
    from zspa.errors import ModelLoadError
    from zspa.export.loading import load_model

    with pytest.raises(ModelLoadError, match="unknown model 'lava'"):
        load_model("lava")
    with pytest.raises(ModelLoadError, match="no such directory"):
        load_model(str(tmp_path / "missing-dir"))
    with pytest.raises(ModelLoadError, match="no such directory"):
        load_model("models/qwen2.5-vl/weights")  # a relative path, not an org/name hub id


def test_unsupported_model_types_name_the_supported_families(tmp_path):
    from zspa.errors import ModelLoadError
    from zspa.export.loading import load_model

    (tmp_path / "smolvlm").mkdir()
    (tmp_path / "smolvlm" / "config.json").write_text('{"model_type": "smolvlm"}')
    supported = r"'smolvlm' is not supported yet \(supported: gemma3, internvl, llava, qwen2_5_vl, qwen2_vl, qwen3_vl\)"
    with pytest.raises(ModelLoadError, match=supported):
        load_model(str(tmp_path / "smolvlm"))
    # Qwen3-VL's mixture-of-experts models are refused with the reason and the way out.
    (tmp_path / "moe").mkdir()
    (tmp_path / "moe" / "config.json").write_text('{"model_type": "qwen3_vl_moe"}')
    with pytest.raises(ModelLoadError, match=r"'qwen3_vl_moe' is not supported: .*mixture-of-experts.*qwen3-vl-2b"):
        load_model(str(tmp_path / "moe"))


def test_fp16_export_runs(tmp_path, photo_path):
    from zspa.export.exporter import ExportOptions, export_bundle
    from zspa.runtime.pipeline import Pipeline

    out = tmp_path / "fp16"
    report = export_bundle(ExportOptions("tiny-random-llava", out, keeps=[0.1], dtype="fp16", progress=False))
    manifest = report.manifest
    assert manifest.dtype == manifest.decoder.kv_dtype == "float16"
    assert manifest.graphs["decoder"].inputs[0].dtype == "float16"
    assert manifest.parity["logits_max_abs_diff"] > 0  # measured, not assumed
    result = Pipeline.load(out).generate(photo_path, "What is it?", max_new_tokens=4)
    assert result.stats.tokens_generated == 4


@pytest.mark.parametrize("bundle_fixture", ["tiny_bundle", "qwen_bundle"])
def test_graphs_declare_the_oldest_ir_version_their_opset_needs(bundle_fixture, request):
    """onnx 1.23 stamps IR 14; JetPack 6's onnxruntime (1.18) reads IR ≤ 10, the last Python 3.10
    wheels (1.23) IR ≤ 11. Opset 18 needs IR 8."""
    import onnx

    bundle = request.getfixturevalue(bundle_fixture)
    graphs = sorted(bundle.glob("*.onnx"))
    assert graphs
    for path in graphs:
        model = onnx.load(str(path), load_external_data=False)
        assert model.ir_version == 8, path.name


def _digests(bundle) -> dict[str, str]:
    return {str(path.relative_to(bundle)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(bundle.rglob("*")) if path.is_file()}


def test_exports_are_byte_identical(tiny_bundle, tmp_path):
    """Signing, caching and "is this the bundle I tested?" need the same flags to give the same
    bytes: exported again in this process (whose earlier builds must not leak into names) and in
    another one, every file's sha256 equals the session bundle's."""
    from zspa.export.exporter import ExportOptions, export_bundle

    expected = _digests(tiny_bundle)
    keeps = [pruner.keep for pruner in Manifest.read(tiny_bundle / "manifest.json").pruners]  # the fixture's
    assert {"manifest.json", "decoder.onnx", "pruner-zspa.onnx"} <= expected.keys()
    export_bundle(ExportOptions("tiny-random-llava", tmp_path / "here", keeps=keeps, progress=False))
    assert _digests(tmp_path / "here") == expected
    other = subprocess.run([sys.executable, "-m", "zspa.cli.export", "--model", "tiny-random-llava",
                            "--keep", ",".join(map(str, keeps)),
                            "-o", str(tmp_path / "there"), "--quiet"], capture_output=True, text=True, timeout=300)
    assert other.returncode == 0, other.stderr
    assert _digests(tmp_path / "there") == expected


@pytest.mark.parametrize("method", sorted(METHOD_DEFAULTS))
def test_pruner_graphs_number_their_names_per_build(method):
    assert build_pruner(method, {}, hidden=16).SerializeToString() == \
        build_pruner(method, {}, hidden=16).SerializeToString()
