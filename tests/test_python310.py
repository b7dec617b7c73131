"""The runtime and the service on Python 3.10, what JetPack 6 ships: a real interpreter when the
machine has one, and a guard for the one difference that has bitten (asyncio's TimeoutError)."""

from __future__ import annotations

import ast
import glob
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from zspa.testing import chat_body, data_url, running_server

ROOT = Path(__file__).resolve().parent.parent



def runtime_requirements() -> list[str]:
    """The base install plus the [serve] extra, read from pyproject.toml."""
    import tomllib  # the suite runs on ≥ 3.11; only the venv below is 3.10

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["serve"]]


def python310() -> str | None:
    """A working Python 3.10: $ZSPA_PYTHON310, python3.10 on PATH, or a pyenv install."""
    candidates = [os.environ.get("ZSPA_PYTHON310"), shutil.which("python3.10"),
                  *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.10*/bin/python3.10")))]
    for candidate in filter(None, candidates):
        done = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                              text=True)
        if done.returncode == 0 and done.stdout.strip() == "(3, 10)":
            return candidate
    return None


def test_no_builtin_timeouterror_where_asyncio_raises_its_own():
    """asyncio.wait_for raises asyncio.TimeoutError, which is not the builtin before 3.11: catching
    the builtin turned every plain request into a 500 on 3.10."""
    offenders = []
    for path in (ROOT / "runtime").rglob("*.py"):
        tree = ast.parse(path.read_text())
        uses_asyncio_timeouts = any(isinstance(n, ast.Attribute) and n.attr in ("wait_for", "timeout")
                                    for n in ast.walk(tree))
        for handler in (n for n in ast.walk(tree) if isinstance(n, ast.ExceptHandler)):
            bare = [n.id for n in ast.walk(handler.type) if isinstance(n, ast.Name)] if handler.type else []
            if uses_asyncio_timeouts and "TimeoutError" in bare:  # asyncio.TimeoutError is an Attribute
                offenders.append(f"{path.relative_to(ROOT)}:{handler.lineno}")
    assert not offenders, f"catch asyncio.TimeoutError instead: {offenders}"


@pytest.fixture(scope="module")
def venv310(tmp_path_factory) -> str:
    interpreter = python310()
    if interpreter is None:
        pytest.skip("no Python 3.10 interpreter on this machine (set ZSPA_PYTHON310 to one)")
    venv = tmp_path_factory.mktemp("py310") / "venv"
    subprocess.run([interpreter, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    install = subprocess.run([python, "-m", "pip", "install", "-q", *runtime_requirements()], capture_output=True,
                             text=True, timeout=900)
    if install.returncode != 0:
        pytest.skip(f"cannot install the runtime's requirements for Python 3.10: {install.stderr[-500:]}")
    source = tmp_path_factory.mktemp("source") / "zspa"  # pip builds in the source tree: keep build/ out of ours
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "bundles",
                                                               "__pycache__", "site", "results"))
    install = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", str(source)], capture_output=True,
                             text=True, timeout=900)
    assert install.returncode == 0, f"this checkout does not install on Python 3.10: {install.stderr[-2000:]}"
    return python


@pytest.mark.slow
def test_plain_and_streaming_requests_on_python310(venv310, tiny_bundle, pipeline, photo_path, tmp_path):
    """The service from this checkout, installed under 3.10 (no torch):
    a plain request answers 200 with the pipeline's own answer, and a stream completes."""
    url = data_url(photo_path.read_bytes())
    expected = pipeline.generate(photo_path, "What is in the picture?", max_new_tokens=8).text
    with running_server(tiny_bundle, tmp_path / "serve.log", python=venv310) as server:
        plain = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                           json=chat_body(url, max_tokens=8, temperature=0))
        assert plain.status_code == 200, plain.text
        assert plain.json()["choices"][0]["message"]["content"] == expected
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=60,
                          json=chat_body(url, max_tokens=8, stream=True)) as stream:
            assert stream.status_code == 200
            assert "data: [DONE]" in "".join(stream.iter_text())
    assert "Traceback" not in (tmp_path / "serve.log").read_text()
    version = subprocess.run([venv310, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                             text=True, cwd=ROOT)
    assert version.stdout.strip() == "(3, 10)"
