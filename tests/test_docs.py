"""The README's promises that a machine can check: its two commands, and CI running the second."""

from __future__ import annotations

import re
from pathlib import Path

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
