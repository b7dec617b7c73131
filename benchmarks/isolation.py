"""Each side of a comparison in a process of its own, the sides alternating over rounds.

In one process, torch's worker threads stay busy after `generate` returns and slow whatever runs
next, so an in-process comparison measures the order of its runs. A benchmark script calls itself
with `--worker KIND ...`; the worker prints one JSON object as its last line of output.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def run_worker(script: str | Path, kind: str, **options) -> dict:
    """Runs `script --worker kind --option value ...` in a fresh interpreter; its last stdout line."""
    command = [sys.executable, str(script), "--worker", kind]
    for key, value in options.items():
        flag = f"--{key.replace('_', '-')}"
        if value is True:
            command.append(flag)
        elif value is not None and value is not False:
            command += [flag, *map(str, value if isinstance(value, (list, tuple)) else [value])]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def alternate(sides: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each side's measurement once per round, the sides in turn, so drift hits all of them."""
    values: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, measure in sides.items():
            values[name].append(measure())
    return values


def ratios(numerators: list[float], denominators: list[float]) -> list[float]:
    """Round-by-round ratios (the two sides measured in the same round)."""
    return [a / b for a, b in zip(numerators, denominators)]


def spread(values: list[float], digits: int = 2) -> str:
    """`median (min … max)`, the way every figure is printed."""
    return f"{statistics.median(values):.{digits}f} (min {min(values):.{digits}f}, max {max(values):.{digits}f})"


def median_ms(call: Callable[[], object], runs: int) -> float:
    """Median wall time of `call` in milliseconds over `runs`, after one warm-up call."""
    call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)
