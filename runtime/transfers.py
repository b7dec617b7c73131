"""Bytes that cross between host memory (numpy) and a backend's device, counted where they cross.

On a GPU each of them is a PCIe (or, on Jetson, a cache-flushing) copy, and a decode step that
copies more than its token ids in and its logits out pays a host round trip per token. Every
backend counts its copies here, so a test on CPU can check what a decode step and a join move:
on `ort-cpu` the "device" is onnxruntime's own buffers, and the copies counted are exactly the
ones a CUDA provider would make.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Transfers:
    to_device: int = 0
    to_host: int = 0

    def sent(self, array: np.ndarray) -> np.ndarray:
        """Counts `array` as copied to the device; returns it (for use inline in a feed)."""
        self.to_device += array.nbytes
        return array

    def received(self, array: np.ndarray) -> np.ndarray:
        """Counts `array` as copied back to the host; returns it."""
        self.to_host += array.nbytes
        return array

    def snapshot(self) -> tuple[int, int]:
        """(to_device, to_host) so far, to subtract from a later snapshot."""
        return self.to_device, self.to_host
