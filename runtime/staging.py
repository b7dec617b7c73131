"""Atomic bundle output: build in a hidden directory beside the target, then swap it in.

Whatever kills the writer (an exception, a full disk, SIGKILL, a power cut after the swap), the
target is the previous bundle or the new one, never a mix or nothing. Hidden leftovers carry the
writer's pid; the next export or calibration to the same target removes those of dead writers.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from zspa.errors import InvalidInputError, ZspaError
from zspa.manifest import MANIFEST_NAME
from zspa.runtime.bundle import Bundle

ENGINES_DIR = "engines"  # zspa-build's output inside a bundle
PARTIAL, RETIRED = ".partial", ".old"  # a bundle being written; the previous one, during a two-step swap
_LEFTOVER = re.compile(r"zspa-(\d+)-\w*\.(partial|old)")  # after ".<target name>."
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextlib.contextmanager
def staged_directory(target: Path, *, force: bool, replaceable: Callable[[Path], None] | None = None
                     ) -> Iterator[Path]:
    """Yields an empty directory that replaces `target` only if the block succeeds.

    `force` is needed to replace an existing bundle, and nothing that is not a bundle is ever
    replaced (`replaceable` raises for what may not be: by default anything but a zspa bundle;
    `engine_folder` for zspa-build's output). Each writer stages in a directory of its own, so two
    at once never touch each other's files; the last to finish is what `target` holds, whole. A
    full disk is reported as such, naming the target, with nothing left behind.
    """
    target = target.resolve()
    remove_leftovers(target)
    if target.exists():
        if not force:
            raise InvalidInputError(f"{target} already exists; pass --force to replace it")
        (replaceable or _require_replaceable)(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=_leftover_prefix(target), suffix=PARTIAL, dir=target.parent))
    try:
        yield staging
        _sync_tree(staging)
        _publish(staging, target)
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        free = shutil.disk_usage(target.parent).free / 2**20
        raise ZspaError(f"{target}: the disk is full ({exc.strerror}; {free:.0f} MiB free); nothing was written "
                        "and any previous bundle there is unchanged: free some space and rerun") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def remove_leftovers(target: Path) -> list[Path]:
    """Removes the hidden directories dead writers left beside `target`, first putting back a
    previous bundle a two-step swap had set aside; returns what it removed or restored."""
    prefix = f".{target.name}."
    found = [entry for entry in target.parent.iterdir() if entry.name.startswith(prefix)] \
        if target.parent.is_dir() else []
    handled = []
    for entry in sorted(found, key=lambda e: not e.name.endswith(RETIRED)):  # restore before anything else
        match = _LEFTOVER.fullmatch(entry.name[len(prefix):])
        if match is None or _alive(int(match[1])):
            continue
        if entry.name.endswith(RETIRED) and not target.exists():
            entry.rename(target)
        else:
            shutil.rmtree(entry, ignore_errors=True)
        handled.append(entry)
    return handled


def _leftover_prefix(target: Path) -> str:
    return f".{target.name}.zspa-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _sync_tree(root: Path) -> None:
    """Every file and directory on disk before the swap: after a power cut the swap never points
    at data still in the page cache."""
    for directory, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(directory, name), "rb") as file:
                os.fsync(file.fileno())
        _sync_directory(Path(directory))


def _sync_directory(directory: Path) -> None:
    if sys.platform == "win32":  # directories cannot be opened for fsync there
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(staging: Path, target: Path) -> None:
    if not target.exists():
        staging.rename(target)
    else:
        try:
            exchange(staging, target)  # one step: `target` is always a whole bundle
        except NotImplementedError:  # not Linux, or a filesystem without it: two renames
            retired = target.with_name(f"{_leftover_prefix(target)}swap{RETIRED}")
            target.rename(retired)  # a kill here leaves `retired`, which the next run puts back
            staging.rename(target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            shutil.rmtree(staging, ignore_errors=True)  # it holds the previous bundle now
    _sync_directory(target.parent)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def exchange(a: Path, b: Path) -> None:
    """Swaps two paths atomically (Linux renameat2 RENAME_EXCHANGE, glibc ≥ 2.28: JetPack 6 has
    2.35); NotImplementedError where the system or the filesystem cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
    if renameat2 is None:
        raise NotImplementedError("no renameat2")
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise NotImplementedError(os.strerror(code))
        raise OSError(code, os.strerror(code), str(a), None, str(b))


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


def engine_folder(target: Path) -> None:
    """zspa-build's output may be replaced: a folder of TensorRT plans and their build record, nothing else."""
    from zspa.runtime.engines import RECORD_NAME

    entries = list(target.iterdir()) if target.is_dir() else None
    if entries is None or not (target / RECORD_NAME).is_file() or any(
            entry.name != RECORD_NAME and entry.suffix != ".plan" for entry in entries):
        raise InvalidInputError(f"{target} exists and is not a zspa-build engine folder; refusing to replace it")


def write_atomically(path: Path, data: bytes) -> None:
    """`path` holds the old bytes or the new ones, never a part: written beside it, then renamed over it."""
    staging = path.with_name(f"{_leftover_prefix(path)}write{PARTIAL}")
    try:
        staging.write_bytes(data)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
