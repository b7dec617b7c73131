"""A bound on the preprocessed images requests hold between preparation and prefill.

A request's images are preprocessed in its own thread, then wait in the queue for the decoding
worker: 64 queued requests of 8 images at Qwen-VL's largest (24 MB of float32 patches each) would
hold 12 GB, more than an Orin has. Each request reserves its images' bytes before it queues and
gives them back once prefilled (or refused, or gone); past the bound it is answered 429 and its
images are dropped at once.
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
