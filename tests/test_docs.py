"""The README's promises that a machine can check: its two commands, CI running the second, a
front door short enough to read, and a docs site that builds."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text(), flags=re.S)[:2]


def test_ci_runs_the_readme_test_command():
    _, test_command = readme_commands()
    assert "pytest" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_main_command_uses_shipped_files():
    main_command, _ = readme_commands()
    assert re.search(r"zspa-export --model (tiny-random-llava|shapes-llava) --keep 0\.1 ", main_command)
    image = re.search(r"--image (\S+)", main_command).group(1)
    assert (ROOT / image).is_file()


README_MAX_LINES = 250  # a front door read in five minutes; the manual is the docs site


def test_readme_is_a_front_door_that_links_to_pages_that_exist():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert len(links) >= 10
    assert [link for link in links if not (ROOT / link).is_file()] == []


def test_the_docs_site_builds_strictly(tmp_path):
    """Every page in the navigation, every link and anchor resolving: `mkdocs build --strict`
    turns each broken one into a failure."""
    pytest.importorskip("material", reason="the docs extra is not installed (pip install -e '.[docs]')")
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                           cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert built.returncode == 0, built.stderr
    assert (tmp_path / "site" / "architecture" / "index.html").is_file()
