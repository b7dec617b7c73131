"""A bound on the preprocessed images requests hold between preparation and prefill.

A request's images are preprocessed in its own thread, wait for the vision stage there, then wait
in the queue for the decoding worker as their kept tokens: 64 queued requests of 8 images at
Qwen-VL's largest (24 MB of float32 patches each) would hold 12 GB, more than an Orin has. Each
request reserves its images' bytes before its vision stage, trades them for its kept tokens'
bytes after it (`exchange`), and gives them back once prefilled (or refused, or gone); past the
bound it is answered 429 and its images are dropped at once.
"""

from __future__ import annotations

import threading


class ImageMemory:
    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self.used_bytes = 0
        self._lock = threading.Lock()

    def reserve(self, size: int) -> bool:
        """Takes `size` bytes if they fit under the bound; False (nothing taken) if not."""
        with self._lock:
            if self.used_bytes + size > self.limit_bytes:
                return False
            self.used_bytes += size
            return True

    def release(self, size: int) -> None:
        with self._lock:
            self.used_bytes -= size

    def exchange(self, held: int, size: int) -> bool:
        """Trades `held` reserved bytes for `size`: always when it shrinks, only under the bound
        when it grows; False (the `held` bytes still reserved) if it does not fit."""
        with self._lock:
            if size > held and self.used_bytes + size - held > self.limit_bytes:
                return False
            self.used_bytes += size - held
            return True
