"""Atomic bundle output: build in a temporary directory beside the target, then rename."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from zspa.errors import InvalidInputError
from zspa.manifest import MANIFEST_NAME


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
        if not target.is_dir() or (any(target.iterdir()) and not (target / MANIFEST_NAME).is_file()):
            raise InvalidInputError(f"{target} exists and is not a zspa bundle; refusing to replace it")
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
