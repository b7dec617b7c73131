"""An LRU of vision-graph outputs, bounded in bytes: several questions about one camera frame,
or a multi-turn chat about one photo, run the vision graph once.

Keyed by a digest of the image after this bundle's resize and crop (uint8, before
normalisation): the vision graph's feeds are a function of those pixels alone, and hashing
them costs a seventh of hashing the float32 feeds. The same image sent as PNG and as a
byte-identical re-encode hits; a resized one does not. One cache serves one bundle (the
preprocessing is the bundle's). Thread-safe (a server may prepare requests on several threads).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np


class VisionCache:
    def __init__(self, max_bytes: int):
        if max_bytes < 1:
            raise ValueError(f"vision cache size must be ≥ 1 byte, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @staticmethod
    def key(pixels: np.ndarray) -> str:
        """The digest of a preprocessed image (`VisionInput.pixels`): its shape, dtype and bytes."""
        array = np.ascontiguousarray(pixels)
        digest = hashlib.sha256(f"{array.dtype.str}:{array.shape};".encode())
        digest.update(array.data)
        return digest.hexdigest()

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            features = self._entries.get(key)
            if features is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return features

    def put(self, key: str, features: np.ndarray) -> None:
        """Keeps `features` (read-only from now on), evicting the least recently used entries;
        an output larger than the whole cache is not kept."""
        if features.nbytes > self.max_bytes:
            return
        features.setflags(write=False)
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = features
            self._bytes += features.nbytes
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)
