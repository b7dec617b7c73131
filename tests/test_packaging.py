"""Layout (DESIGN §2): one namespace over the card's folders; the runtime never needs torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _imported_after(code: str) -> set[str]:
    script = f"{code}\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_namespace_maps_card_folders():
    import zspa.calibration
    import zspa.export
    import zspa.runtime

    assert Path(zspa.runtime.__file__).resolve().parent == ROOT / "runtime"
    assert Path(zspa.export.__file__).resolve().parent == ROOT / "export"
    assert Path(zspa.calibration.__file__).resolve().parent == ROOT / "calibration"


def test_each_module_has_one_name():
    """The card's folders load only as `zspa.…`: a second name would give two `Bundle` classes
    (an isinstance that fails, a registry filled twice). Checked from the repository root, where
    `runtime/` is importable as a top-level package if anything asks for it."""
    modules = _imported_after("import zspa.runtime.pipeline, zspa.runtime.server.app, zspa.export.exporter, "
                              "zspa.calibration.calibrate, zspa.cli.export, zspa.cli.serve, zspa.testing")
    assert {"zspa.runtime.bundle", "zspa.export.exporter", "zspa.calibration.calibrate"} <= modules
    top_level = {name for name in modules if name.split(".")[0] in ("runtime", "export", "calibration")}
    assert top_level == set()


def test_import_zspa_is_light():
    modules = _imported_after("import zspa, zspa.manifest, zspa.errors, zspa.pruning")
    assert not {"torch", "onnxruntime", "transformers", "onnx"} & modules


@pytest.mark.parametrize(
    "code",
    [
        "import zspa.runtime",
        "import zspa.runtime.pipeline, zspa.runtime.bundle, zspa.runtime.images",
        "import zspa.cli.run",
        "import zspa.cli.serve, zspa.runtime.server.app",
        "import zspa.runtime.trt_backend, zspa.runtime.engines, zspa.runtime.trt_build",
        "import zspa.runtime.profiling, zspa.cli.profile",
    ],
)
def test_runtime_never_imports_torch_transformers_or_matplotlib(code):
    """A device installs the runtime alone; matplotlib is the plots extra, imported only to draw."""
    modules = _imported_after(code)
    assert not {"torch", "transformers", "matplotlib"} & modules


def test_zspa_run_end_to_end_imports_no_torch(tiny_bundle, photo_path):
    """The CLI itself, answering a prompt, in a fresh interpreter."""
    code = (
        "import sys\nfrom zspa.cli.run import main\n"
        f"rc = main([{str(tiny_bundle)!r}, '--image', {str(photo_path)!r}, '--prompt', 'hi', '--max-new-tokens', '2',"
        " '--json'])\nassert rc == 0"
    )
    modules = _imported_after(code)
    assert "torch" not in modules and "transformers" not in modules
    assert "onnxruntime" in modules  # it really ran the graphs


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="not a git checkout")
def test_shipped_weights_are_tracked_by_git():
    """A built-in's weights that .gitignore swallows exist here but not in a clean clone."""
    from zspa.export.loading import _trained_builtins

    for name, (directory, _) in _trained_builtins().items():
        weights = (directory / "model.safetensors").relative_to(ROOT)
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", str(weights)], cwd=ROOT,
                                 capture_output=True, text=True)
        assert tracked.returncode == 0, f"{name}: {weights} is not tracked by git"
