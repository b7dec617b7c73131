"""Shared fixtures: the tiny model and its bundle are built once per test session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

KEEPS = (0.1, 0.25)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub


@pytest.fixture(scope="session")
def tiny_hf():
    """(model, processor) of tiny-random-llava, as transformers objects."""
    from zspa.export.tiny import build_tiny_llava

    return build_tiny_llava()


def _export_builtin(tmp_path_factory, model: str, name: str, **options) -> Path:
    """A built-in model exported at KEEPS (and `options`, ExportOptions'), once per test session."""
    from zspa.export.exporter import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundles") / name
    export_bundle(ExportOptions(model, out, keeps=list(KEEPS), progress=False, **options))
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """tiny-random-llava exported at keep 0.1 and 0.25 (read-only: copy it before changing it)."""
    return _export_builtin(tmp_path_factory, "tiny-random-llava", "tiny")


@pytest.fixture(scope="session")
def static_bundle(tmp_path_factory) -> Path:
    """tiny-random-llava exported with --kv-cache static (TensorScatter + Attention, opset 24)."""
    return _export_builtin(tmp_path_factory, "tiny-random-llava", "tiny-static", kv_cache="static")


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    """A private copy of the tiny bundle that a test may damage."""
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    return copy


@pytest.fixture(scope="session")
def pipeline(tiny_bundle):
    from zspa.runtime.pipeline import Pipeline

    return Pipeline.load(tiny_bundle)


def _builtin_fixtures(prefix: str, model: str, folder: str, pan_and_scan: bool | None = None):
    """Session fixtures `{prefix}_hf` (model, processor parts as transformers objects), `{prefix}_bundle`
    (the model exported at KEEPS into `folder`, read-only) and `{prefix}_pipeline` of a built-in model.
    `pan_and_scan` (Gemma 3) is set in the processor, as a checkpoint's preprocessor_config.json would."""

    @pytest.fixture(scope="session", name=f"{prefix}_hf")
    def hf():
        from zspa.families import build_tiny_model

        model_, processor = build_tiny_model(model)
        if pan_and_scan is not None:
            processor.image_processor.do_pan_and_scan = pan_and_scan
        return model_, processor

    @pytest.fixture(scope="session", name=f"{prefix}_bundle")
    def bundle(tmp_path_factory) -> Path:
        return _export_builtin(tmp_path_factory, model, folder, pan_and_scan=pan_and_scan)

    @pytest.fixture(scope="session", name=f"{prefix}_pipeline")
    def pipeline_(request):
        from zspa.runtime.pipeline import Pipeline

        return Pipeline.load(request.getfixturevalue(f"{prefix}_bundle"))

    return hf, bundle, pipeline_


qwen_hf, qwen_bundle, qwen_pipeline = _builtin_fixtures("qwen", "tiny-random-qwen2.5-vl", "tiny-qwen")
qwen2_hf, qwen2_bundle, qwen2_pipeline = _builtin_fixtures("qwen2", "tiny-random-qwen2-vl", "tiny-qwen2")
qwen3_hf, qwen3_bundle, qwen3_pipeline = _builtin_fixtures("qwen3", "tiny-random-qwen3-vl", "tiny-qwen3")
internvl_hf, internvl_bundle, internvl_pipeline = _builtin_fixtures("internvl", "tiny-random-internvl3",
                                                                    "tiny-internvl")
# Gemma 3 with pan&scan on: wide and tall images become several blocks (the plain one is in test_gemma3.py).
gemma3_hf, gemma3_bundle, gemma3_pipeline = _builtin_fixtures("gemma3", "tiny-random-gemma3", "tiny-gemma3",
                                                              pan_and_scan=True)

# The Qwen families (manifest `family`) and their fixtures' prefix.
QWEN_FAMILIES = {"qwen2_5_vl": "qwen", "qwen2_vl": "qwen2", "qwen3_vl": "qwen3"}


def _family(request, prefixes: dict[str, str]):
    prefix = prefixes[request.param]
    return request.param, *(request.getfixturevalue(f"{prefix}_{part}") for part in ("hf", "bundle", "pipeline"))


@pytest.fixture(scope="module", params=list(QWEN_FAMILIES))
def qwen_family(request):
    """(family name, (transformers model, processor), bundle, pipeline) of each Qwen family's tiny model."""
    return _family(request, QWEN_FAMILIES)


# Families whose images give a varying number of visual tokens, and their fixtures' prefix, for the
# command matrix. Qwen2-VL is Qwen2.5-VL's path with another vision graph, which test_qwen.py checks
# on both; leaving it out of the matrix keeps the suite under its 20 minutes.
DYNAMIC_FAMILIES = {"qwen2_5_vl": "qwen", "qwen3_vl": "qwen3", "internvl": "internvl", "gemma3": "gemma3"}


@pytest.fixture(scope="module", params=list(DYNAMIC_FAMILIES))
def dynamic_family(request):
    """`qwen_family`'s tuple for each dynamic-resolution family's tiny model (Qwen2.5-VL, Qwen3-VL,
    InternVL, Gemma 3 with pan&scan)."""
    return _family(request, DYNAMIC_FAMILIES)


def _sample(name: str) -> Path:
    import matplotlib.cbook

    return Path(matplotlib.cbook.get_sample_data(name, asfileobj=False))


@pytest.fixture(scope="session")
def photo_path() -> Path:
    """A real photograph (Grace Hopper, public domain, shipped with matplotlib), 512x600 JPEG."""
    return _sample("grace_hopper.jpg")


@pytest.fixture(scope="session")
def rgba_png_path() -> Path:
    """A real PNG with an alpha channel, shipped with matplotlib."""
    return _sample("Minduka_Present_Blue_Pack.png")
