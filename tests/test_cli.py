"""The commands as a user runs them: output, exit codes, one-line errors, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def zspa(command: str, *args, env=None, timeout=300):
    module = {"zspa-run": "zspa.cli.run", "zspa-export": "zspa.cli.export"}[command]
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_run_streams_answer_and_summary(tiny_bundle, photo_path):
    out = zspa("zspa-run", tiny_bundle, "--image", photo_path, "--prompt", "What is here?", "--max-new-tokens", "6")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    summary = out.stderr.strip().splitlines()
    assert "visual tokens 576→58" in summary[0] and "prefill" in summary[0] and "tokens/s" in summary[0]
    assert "gibberish" in summary[1]


def test_run_json_has_the_documented_fields(tiny_bundle, photo_path):
    out = zspa("zspa-run", tiny_bundle, "--image", photo_path, "--prompt", "What is here?", "--json", "--method",
               "zspa", "--keep", "0.25", "--max-new-tokens", "4", "--temperature", "0.7", "--seed", "1")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["visual_tokens"] == {"total": 576, "kept": 144}
    assert set(report["timings_ms"]) >= {"vision", "prune", "prefill", "decode"}
    assert report["tokens_generated"] == 4 and isinstance(report["text"], str)
    assert report["random_weights"] is True


def test_run_takes_several_images_in_order(tiny_bundle, pipeline, photo_path, rgba_png_path):
    """A repeated --image adds an image (it used to replace the first), each kept on its own."""
    out = zspa("zspa-run", tiny_bundle, "--image", photo_path, "--image", rgba_png_path, "--prompt", "Which is blue?",
               "--json", "--keep", "0.25", "--max-new-tokens", "6")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    expected = pipeline.generate([photo_path, rgba_png_path], "Which is blue?", keep=0.25, max_new_tokens=6)
    assert report["visual_tokens"] == {"total": 2 * 576, "kept": 2 * 144}
    assert report["text"] == expected.text and report["kept_indices"] == expected.kept_indices.tolist()
    swapped = pipeline.generate([rgba_png_path, photo_path], "Which is blue?", keep=0.25, max_new_tokens=6)
    assert swapped.kept_indices.tolist() != report["kept_indices"]  # the order reached the pipeline


def _truncated(photo_path, tmp_path):
    path = tmp_path / "half.jpg"
    path.write_bytes(photo_path.read_bytes()[:5000])
    return path


def _huge(photo_path, tmp_path):
    from PIL import Image

    path = tmp_path / "bomb.png"
    Image.new("L", (8000, 8000)).save(path)
    return path


@pytest.mark.parametrize(
    "case, extra, message",
    [
        ("keep zero", ["--keep", "0"], "keep must be in (0, 1]"),
        ("keep above one", ["--keep", "1.2"], "keep must be in (0, 1]"),
        ("method not exported", ["--method", "divprune"], "'divprune' is not in this bundle"),
        ("overlong prompt", ["--prompt", "word " * 3000], "over the context"),
        ("bad temperature", ["--temperature", "-1"], "temperature must be"),
    ],
)
def test_bad_arguments_give_one_line_errors(tiny_bundle, photo_path, case, extra, message):
    args = [tiny_bundle, "--image", photo_path, "--prompt", "hi", *extra]
    out = zspa("zspa-run", *args)
    assert out.returncode == 2, case
    assert out.stderr.strip().splitlines() == [out.stderr.strip()], case
    assert message in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("make, message", [(_truncated, "corrupt or truncated"), (_huge, "pixel limit")])
def test_bad_images_give_one_line_errors(tiny_bundle, photo_path, tmp_path, make, message):
    out = zspa("zspa-run", tiny_bundle, "--image", make(photo_path, tmp_path), "--prompt", "hi")
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def test_damaged_bundles_give_one_line_errors(bundle_copy, photo_path):
    (bundle_copy / "vision.onnx").write_bytes(b"not the graph")
    out = zspa("zspa-run", bundle_copy, "--image", photo_path, "--prompt", "hi")
    assert out.returncode == 3 and "vision.onnx: sha256 does not match" in out.stderr
    assert "Traceback" not in out.stderr
    (bundle_copy / "vision.onnx").unlink()
    out = zspa("zspa-run", bundle_copy, "--image", photo_path, "--prompt", "hi")
    assert out.returncode == 3 and "vision.onnx: missing" in out.stderr
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["schema_version"] = 7
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    out = zspa("zspa-run", bundle_copy, "--image", photo_path, "--prompt", "hi")
    assert out.returncode == 3 and "newer than this zspa supports" in out.stderr


def test_debug_shows_the_traceback(tiny_bundle, photo_path):
    out = zspa("zspa-run", tiny_bundle, "--image", photo_path, "--prompt", "hi", "--keep", "0", "--debug")
    assert out.returncode != 0 and "Traceback" in out.stderr and "InvalidInputError" in out.stderr


def test_export_reports_graphs_and_parity(tmp_path):
    out = zspa("zspa-export", "--model", "tiny-random-llava", "--keep", "0.1,0.05", "-o", tmp_path / "b", "--quiet")
    assert out.returncode == 0, out.stderr
    assert "pruner-zspa " in out.stdout and "keep 0.05 by default, any keep per request" in out.stdout
    assert "parity vs transformers" in out.stdout and "gibberish" in out.stdout
    again = zspa("zspa-export", "--model", "tiny-random-llava", "-o", tmp_path / "b", "--quiet")
    assert again.returncode == 2 and "--force" in again.stderr


@pytest.mark.parametrize("args, message", [
    (["--keep", "0"], "keep must be in (0, 1]"),
    (["--keep", "1.5"], "keep must be in (0, 1]"),
    (["--keep-tokens", "0"], "--keep-tokens must be"),
    (["--relevance-ratio", "2"], "relevance ratio must be in [0, 1]"),
])
def test_export_refuses_bad_options_before_any_work(tmp_path, args, message):
    out = zspa("zspa-export", "--model", "tiny-random-llava", "-o", tmp_path / "b", *args, timeout=60)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "b").exists()
