"""The server's glibc malloc settings: a block freed no longer moves the mmap threshold up."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

# In a fresh process: free an 8 MiB block (by default glibc then raises its mmap threshold to
# 8 MiB), then count whether a 2 MiB block is mmapped (handed back to the system when freed)
# or comes from the heap (kept).
_PROBE = """
import ctypes, sys
from zspa.runtime.malloc import tune_malloc

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
print(tune_malloc() if sys.argv[1] == "tuned" else "untuned")
libc.free(libc.malloc(8 << 20))
before = libc.mallinfo2().hblks
block = libc.malloc(2 << 20)
print(libc.mallinfo2().hblks - before)
"""


def _mmapped_after_a_big_free(mode: str, **env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True,
                         env={**clean, **env}).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")
def test_the_mmap_threshold_stays_fixed_unless_the_operator_set_it():
    assert _mmapped_after_a_big_free("untuned") == ("untuned", 0)  # glibc's default: from the heap, kept
    assert _mmapped_after_a_big_free("tuned") == ("True", 1)  # tuned: mmapped, returned when freed
    # An operator's own setting wins: a 16 MiB threshold keeps the 2 MiB block on the heap.
    assert _mmapped_after_a_big_free("tuned", MALLOC_MMAP_THRESHOLD_=str(16 << 20)) == ("True", 0)
