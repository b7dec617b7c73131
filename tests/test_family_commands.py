"""Every command on the dynamic-resolution bundles (issue 11, point 7; issues 22 and 23 for
Qwen2-VL, Qwen3-VL, InternVL3 and Gemma 3 with pan&scan): run, serve, eval, profile, calibrate, and zspa-build's
optimisation profiles from the processor's min/max pixels or tiles. Tests that take
`dynamic_family` run on each such family's tiny model, `qwen_family` on the Qwen ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import openai
import pytest

from zspa.calibration.calibrate import CalibrateOptions, calibrate_bundle
from zspa.manifest import Manifest
from zspa.pruning.budget import token_budget
from zspa.runtime.engines import ShapeRanges, optimisation_profile
from zspa.runtime.pipeline import Pipeline
from zspa.testing import chat_body, data_url, running_server

QUESTION = "What is the man wearing on his head?"


def cli(module: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"zspa.cli.{module}", *map(str, args)], capture_output=True,
                          text=True, timeout=600)


def test_run_prunes_by_the_image_s_own_token_count(dynamic_family, photo_path):
    _, _, qwen_bundle, qwen_pipeline = dynamic_family
    out = cli("run", qwen_bundle, "--image", photo_path, "--prompt", QUESTION, "--keep", "0.3", "--json",
              "--max-new-tokens", "4")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    expected = qwen_pipeline.generate(photo_path, QUESTION, keep=0.3, max_new_tokens=4)
    n = expected.stats.visual_tokens_total
    assert result["visual_tokens"] == {"total": n, "kept": token_budget(0.3, n)}
    assert result["text"] == expected.text and result["random_weights"] is True


def test_serve_answers_like_the_pipeline(dynamic_family, photo_path, tmp_path):
    _, _, qwen_bundle, qwen_pipeline = dynamic_family
    expected = qwen_pipeline.generate(photo_path, QUESTION, keep=0.2, max_new_tokens=6)
    with running_server(qwen_bundle, tmp_path / "serve.log") as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        body = chat_body(data_url(photo_path.read_bytes()), QUESTION, model=qwen_bundle.name)
        answer = client.chat.completions.create(**{k: v for k, v in body.items() if k != "messages"},
                                                messages=body["messages"], temperature=0, max_tokens=6,
                                                extra_body={"keep": 0.2})
    assert answer.choices[0].message.content == expected.text
    usage = answer.usage.model_extra
    assert (usage["visual_tokens_total"], usage["visual_tokens_kept"]) == (
        expected.stats.visual_tokens_total, expected.stats.visual_tokens_kept)


def test_eval_and_profile_run_on_the_bundle(dynamic_family, photo_path, tmp_path):
    _, _, qwen_bundle, qwen_pipeline = dynamic_family
    answer = qwen_pipeline.generate(photo_path, QUESTION, keep=1.0, max_new_tokens=4).text
    data = tmp_path / "set.jsonl"
    data.write_text(json.dumps({"image": str(photo_path), "question": QUESTION, "answer": answer}) + "\n")
    run = cli("eval", qwen_bundle, "--data", data, "--out", tmp_path / "eval", "--keeps", "0.1,0.4", "--quiet",
              "--max-new-tokens", "4")
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "eval" / "results.json").read_text())
    rows = {(r["method"], r["keep"]): r for r in report["results"]}
    assert set(rows) == {("none", 1.0), ("zspa", 0.1), ("zspa", 0.4)} and rows[("none", 1.0)]["accuracy"] == 1.0

    run = cli("profile", qwen_bundle, "--image", photo_path, "--runs", "1", "--warmup", "0", "--max-new-tokens", "2",
              "--keeps", "1.0,0.1", "--out", tmp_path / "prof", "--quiet")
    assert run.returncode == 0, run.stderr
    settings = json.loads((tmp_path / "prof" / "profile.json").read_text())["settings"]
    tokens = {r["keep"]: r["visual_tokens"] for r in settings}
    n = tokens[1.0]["total"]
    assert tokens == {1.0: {"total": n, "kept": n}, 0.1: {"total": n, "kept": token_budget(0.1, n)}}


def test_calibrated_bundle_answers(dynamic_family, photo_path, tmp_path):
    qwen_bundle = dynamic_family[2]
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i, size in enumerate([(320, 240), (200, 400), (448, 448), (640, 360)] * 2):
        Image.open(photo_path).convert("RGB").resize(size).save(images / f"{i}.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is this?\nDescribe the picture.\n")
    out = tmp_path / "int"
    calibrate_bundle(CalibrateOptions(qwen_bundle, images, prompts, out, progress=False, fidelity_tokens=2))
    manifest = Manifest.read(out / "manifest.json")
    assert manifest.graphs["vision"].quantization["precision"] == "int8"
    result = Pipeline.load(out).generate(photo_path, QUESTION, keep=0.25, max_new_tokens=3)
    assert result.stats.visual_tokens_kept == token_budget(0.25, result.stats.visual_tokens_total)


@pytest.mark.parametrize("prefix, patch_values, index_input", [("qwen", 3 * 2 * 14 * 14, "window_index"),
                                                                ("qwen3", 3 * 2 * 16 * 16, "position_embed_indices")])
def test_build_profiles_follow_min_and_max_pixels(prefix, patch_values, index_input, request):
    manifest = Manifest.read(request.getfixturevalue(f"{prefix}_bundle") / "manifest.json")
    ranges = ShapeRanges.for_manifest(manifest, max_context=2048)
    vision = optimisation_profile(manifest.graphs["vision"], ranges)
    # min_pixels (56², or 64² at patch 16) → 4 merged tokens, max_pixels → 1280; 4 patches per token
    assert vision["pixel_values"] == ((16, patch_values), (4096, patch_values), (5120, patch_values))
    if index_input == "window_index":
        assert vision["window_index"] == ((4,), (1024,), (1280,))
    else:  # four bilinear taps per patch
        assert vision["position_embed_indices"] == ((16, 4), (4096, 4), (5120, 4))
    pruner = optimisation_profile(manifest.graphs["pruner-zspa"], ranges)
    assert pruner["image_features"][0] == (1, 4, 64) and pruner["image_features"][2] == (1, 1280, 64)
    assert ranges.shape_input_values("budget") == ([1], [102], [1280])  # K: TensorRT reads it as a shape
    decoder = optimisation_profile(manifest.graphs["decoder"], ranges)
    assert decoder["position_ids"][2] == (3, 1, ranges.max_prefill)
    if manifest.decoder.deepstack_layers:
        assert decoder["deepstack_embeds"][2] == (manifest.decoder.deepstack_layers, 1, ranges.max_prefill, 64)


def test_build_profiles_count_internvl_tiles(internvl_bundle):
    """InternVL's vision graph takes an image's tiles as its batch: 1 tile to 12 and a thumbnail."""
    manifest = Manifest.read(internvl_bundle / "manifest.json")
    ranges = ShapeRanges.for_manifest(manifest, max_context=4096)
    vision = optimisation_profile(manifest.graphs["vision"], ranges)
    assert vision["pixel_values"] == ((1, 3, 448, 448), (4, 3, 448, 448), (13, 3, 448, 448))
    pruner = optimisation_profile(manifest.graphs["pruner-zspa"], ranges)
    assert pruner["image_features"][0] == (1, 256, 64) and pruner["image_features"][2] == (1, 13 * 256, 64)
    assert optimisation_profile(manifest.graphs["decoder"], ranges)["position_ids"][2] == (1, ranges.max_prefill)


@pytest.mark.parametrize("model, repository", [("qwen2.5-vl-3b", "Qwen/Qwen2.5-VL-3B-Instruct"),
                                               ("Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct"),
                                               ("qwen2-vl-2b", "Qwen/Qwen2-VL-2B-Instruct"),
                                               ("qwen3-vl-4b", "Qwen/Qwen3-VL-4B-Instruct"),
                                               ("internvl3-1b", "OpenGVLab/InternVL3-1B-hf"),
                                               ("gemma-3-4b", "google/gemma-3-4b-it")])
def test_offline_hub_ids_fail_fast_with_the_way_out(model, repository, tmp_path):
    out = subprocess.run([sys.executable, "-m", "zspa.cli.export", "--model", model, "-o", tmp_path / "b"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 4 and repository in out.stderr and "hf download" in out.stderr


def test_export_from_a_checkpoint_directory(dynamic_family, photo_path, tmp_path):
    """The real loading path (from_pretrained on a directory laid out as the hub's): same weights, same answers."""
    from zspa.export.tiny_qwen import save_checkpoint

    name, qwen_hf, _, qwen_pipeline = dynamic_family
    model, processor = qwen_hf
    save_checkpoint(model, processor, tmp_path / "checkpoint")
    out = cli("export", "--model", tmp_path / "checkpoint", "--keep", "0.1", "-o", tmp_path / "bundle", "--quiet")
    assert out.returncode == 0, out.stderr
    manifest = Manifest.read(tmp_path / "bundle" / "manifest.json")
    assert manifest.family == name and not manifest.source.random_weights
    assert manifest.source.model_id == str((tmp_path / "checkpoint").resolve())
    result = Pipeline.load(tmp_path / "bundle").generate(photo_path, QUESTION, keep=0.1, max_new_tokens=6)
    assert result.token_ids == qwen_pipeline.generate(photo_path, QUESTION, keep=0.1, max_new_tokens=6).token_ids


@pytest.mark.parametrize("prefix, model", [("qwen", "tiny-random-qwen2.5-vl"), ("qwen3", "tiny-random-qwen3-vl"),
                                           ("internvl", "tiny-random-internvl3")])
def test_shared_kv_decoder_answers_as_the_portable_one(prefix, model, photo_path, tmp_path, request):
    """--kv-cache shared (GroupQueryAttention, in-place buffers) under M-RoPE positions, with
    Qwen3-VL's DeepStack planes, and over InternVL's 3,328-token block with 1-D positions."""
    from zspa.export.exporter import ExportOptions, export_bundle

    export_bundle(ExportOptions(model, tmp_path / "shared", keeps=[0.25], kv_cache="shared", progress=False))
    shared, portable = Pipeline.load(tmp_path / "shared"), request.getfixturevalue(f"{prefix}_pipeline")
    for keep in (1.0, 0.25):
        ours = shared.generate(photo_path, QUESTION, keep=keep, max_new_tokens=16).token_ids
        assert ours == portable.generate(photo_path, QUESTION, keep=keep, max_new_tokens=16).token_ids


def test_max_pixels_at_export_bounds_the_tokens_as_the_processor_would(photo_path, tmp_path):
    """--max-pixels (Qwen3-VL's checkpoints allow 16,384 visual tokens): the bundle records the bound,
    its most tokens per image and its engine profiles follow, and images resize as transformers'
    processor does with that bound; a fixed-size model refuses the option."""
    from PIL import Image
    from transformers import Qwen2VLImageProcessorPil

    from zspa.errors import InvalidInputError
    from zspa.export.exporter import ExportOptions, export_bundle

    bound = 64 * 32 * 32  # 64 visual tokens of 32 px
    report = export_bundle(ExportOptions("tiny-random-qwen3-vl", tmp_path / "small", keeps=[0.25], max_pixels=bound,
                                         progress=False))
    vision = report.manifest.vision
    assert (vision.max_pixels, vision.num_tokens) == (bound, 64)
    assert ShapeRanges.for_manifest(report.manifest).max_visual_tokens == 64
    reference = Qwen2VLImageProcessorPil(patch_size=16, min_pixels=64 * 64, max_pixels=bound, image_mean=[0.5] * 3,
                                         image_std=[0.5] * 3)
    image = Image.open(photo_path).convert("RGB").resize((896, 672))
    grid = reference(images=[image], return_tensors="pt")["image_grid_thw"][0]
    result = Pipeline.load(tmp_path / "small").generate(image, QUESTION, keep=1.0, max_new_tokens=2)
    assert result.stats.visual_tokens_total == int(grid.prod()) // 4 <= 64
    with pytest.raises(InvalidInputError, match="dynamic-resolution"):
        export_bundle(ExportOptions("tiny-random-llava", tmp_path / "llava", max_pixels=bound, progress=False))
    with pytest.raises(InvalidInputError, match="over --max-pixels"):
        export_bundle(ExportOptions("tiny-random-qwen3-vl", tmp_path / "x", min_pixels=2 * bound, max_pixels=bound,
                                    progress=False))
