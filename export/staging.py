"""Atomic bundle output: build in a temporary directory beside the target, then rename."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from zspa.errors import InvalidInputError, ZspaError
from zspa.manifest import MANIFEST_NAME
from zspa.runtime.bundle import Bundle

ENGINES_DIR = "engines"  # zspa-build's output inside a bundle


@contextlib.contextmanager
def staged_directory(target: Path, *, force: bool) -> Iterator[Path]:
    """Yields an empty directory that replaces `target` only if the block succeeds.

    A failed or interrupted export leaves `target` exactly as it was. `force` is needed to
    replace an existing bundle, and nothing that is not a bundle is ever replaced.
    """
    target = target.resolve()
    if target.exists():
        if not force:
            raise InvalidInputError(f"{target} already exists; pass --force to replace it")
        _require_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield staging
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            target.rename(retired / target.name)
            staging.rename(target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _require_replaceable(target: Path) -> None:
    """An empty directory, or a zspa bundle holding nothing its manifest does not list (and its
    engines): a directory that merely contains a manifest.json is someone else's."""
    if not target.is_dir():
        raise InvalidInputError(f"{target} exists and is not a zspa bundle; refusing to replace it")
    if not any(target.iterdir()):
        return
    try:
        bundle = Bundle.open(target, verify=False)
    except ZspaError:
        raise InvalidInputError(f"{target} exists and is not a zspa bundle; refusing to replace it") from None
    ours = {Path(name).parts[0] for name in bundle.listed_files()} | {MANIFEST_NAME, ENGINES_DIR}
    strangers = sorted(entry.name for entry in target.iterdir() if entry.name not in ours)
    if strangers:
        raise InvalidInputError(f"{target} holds {', '.join(strangers[:5])}, which its manifest does not list; "
                                "refusing to replace it")
