"""The machine a figure was measured on: CPU model, cores, vector extensions (printed with every result)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

_VECTOR_FLAGS = ("avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "avx2", "fma", "neon", "asimd", "sve")


def describe_machine() -> str:
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model") and value.strip():
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags = set(value.split())
    vector = ", ".join(f for f in _VECTOR_FLAGS if f in flags) or "unknown"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cores available, vector extensions: {vector}"
