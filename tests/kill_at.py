"""Runs a zspa command and SIGKILLs it right after the Nth call of one function returns: what a
killed process leaves behind, at a stage a test names.

    python tests/kill_at.py zspa.export.exporter:export_graph:3 zspa.cli.export --model ...
"""

from __future__ import annotations

import importlib
import os
import signal
import sys


def kill_after(point: str) -> None:
    module_name, function_name, nth = point.split(":")
    module = importlib.import_module(module_name)
    original, calls = getattr(module, function_name), []

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append(None)
        if len(calls) == int(nth):
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(module, function_name, wrapper)


if __name__ == "__main__":
    kill_after(sys.argv[1])
    sys.exit(importlib.import_module(sys.argv[2]).main(sys.argv[3:]))
