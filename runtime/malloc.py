"""glibc malloc settings for a long-lived server: memory it hands back instead of keeping.

By default glibc raises its mmap threshold to the largest block freed so far (up to 32 MiB),
after which every request's arrays (decoded and preprocessed images, spliced prompts, logits)
come from heap arenas that are never returned to the system; and it keeps up to 8 × cores
arenas, one more for each thread that allocates at the same time as another. On the
LLaVA-shaped server (benchmarks/serve_load.py, concurrency 32, vision cache off; 2-core Xeon)
that was 695 MB resident when warm and 798 MB at the peak; with the threshold fixed at 128 KiB
and 2 arenas, 588 and 642 MB. On an 8 GB Jetson, where the GPU shares that memory, it decides
how many slots fit.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
_M_ARENA_MAX = -8
ARENAS = 2
MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value; fixing it stops the dynamic rise


def tune_malloc() -> bool:
    """Fixes the mmap threshold and caps the arenas, each unless the operator set it already
    (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_ARENA_MAX`, which glibc reads at start); call it before
    the model loads. False where the C library is not glibc (macOS, musl), which is left alone."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    done = True
    for variable, option, value in (("MALLOC_MMAP_THRESHOLD_", _M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                                    ("MALLOC_ARENA_MAX", _M_ARENA_MAX, ARENAS)):
        if variable not in os.environ:
            done = mallopt(option, value) == 1 and done
    return done
