"""One pipeline, one worker thread, a bounded queue in front of it.

The pipeline owns one KV cache and onnxruntime sessions sized for one request, so requests run
one at a time; the queue bounds how many may wait (past it the service answers 429), and each
job carries a cancel flag that a disconnect or a timeout sets, which the worker checks between
tokens. Events go back to the request's event loop with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from zspa.errors import ZspaError
from zspa.runtime.pipeline import Pipeline
from zspa.runtime.prompting import Prompt
from zspa.runtime.server.errors import INTERNAL, from_zspa_error
from zspa.runtime.server.metrics import ServerMetrics

log = logging.getLogger("zspa.serve")


class QueueFull(Exception):
    def __init__(self, retry_after_s: int):
        super().__init__(f"queue full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclass
class Job:
    image: Image.Image
    prompt: Prompt
    options: dict[str, Any]  # Pipeline.generate keywords
    keep: float
    method: str
    stream: bool  # send text deltas; a plain request waits for the result only
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = ""
    arrived: float = field(default_factory=time.monotonic)

    def cancel(self, reason: str) -> None:
        if not self.cancelled.is_set():
            self.cancel_reason = reason
            self.cancelled.set()

    def emit(self, kind: str, value: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the request's loop is gone (server stopped): nobody is listening
            pass


class Scheduler:
    def __init__(self, pipeline: Pipeline, max_queue: int, metrics: ServerMetrics):
        self.pipeline = pipeline
        self.metrics = metrics
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._work, name="zspa-pipeline", daemon=True)
        self._service_s = 1.0  # moving average of a job's run time, for Retry-After
        self.ready = threading.Event()
        self.failure: str | None = None

    def start(self, warmup: bool = True) -> None:
        self._warmup = warmup
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Asks the worker to finish after the queued jobs; a daemon thread, so a stuck one never blocks exit."""
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            return
        self._thread.join(timeout_s)

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def submit(self, job: Job) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(max(1, math.ceil(self._service_s * (self.depth + 1)))) from None
        self.metrics.queue_depth.set(self.depth)

    def _work(self) -> None:
        try:
            if self._warmup:
                self._warm_up()
            self.ready.set()
        except Exception as exc:  # a bundle that loads but cannot run: /health reports it
            log.exception("warm-up failed")
            self.failure = f"warm-up failed: {exc}"
            return
        while (job := self._queue.get()) is not None:
            self.metrics.queue_depth.set(self.depth)
            started = time.monotonic()
            self._run(job)
            self._service_s = 0.8 * self._service_s + 0.2 * (time.monotonic() - started)

    def _warm_up(self) -> None:
        """One short generation per keep of every method, so the first request pays no first-run costs."""
        bundle = self.pipeline.bundle
        height, width = bundle.manifest.vision.image_size or (448, 448)  # dynamic resolution: a typical size
        image = Image.new("RGB", (width, height), (128, 128, 128))
        settings = {(keep, method) for method in bundle.methods or [None] for keep in bundle.keeps(method)}
        for keep, method in sorted(settings, key=str):
            self.pipeline.generate(image, "warm up", keep=keep, method=method, max_new_tokens=2)
        log.info("warmed up %d setting(s)", len(settings))

    def _run(self, job: Job) -> None:
        if job.cancelled.is_set():
            self.metrics.cancelled.labels(job.cancel_reason).inc()
            return
        self.metrics.queue_wait.observe(time.monotonic() - job.arrived)
        self.metrics.running.set(1)
        try:
            stream = self.pipeline.generate(job.image, job.prompt, stream=True, **job.options)
            job.emit("started")
            for delta in stream:
                if job.stream:
                    job.emit("delta", delta)
                if job.cancelled.is_set():
                    self.metrics.cancelled.labels(job.cancel_reason).inc()
                    return
            self.metrics.observe_generation(stream.result.stats, job.keep, job.method)
            job.emit("done", stream.result)
        except ZspaError as exc:
            job.emit("error", from_zspa_error(exc, "messages"))
        except Exception:
            log.exception("generation failed")
            job.emit("error", INTERNAL)
        finally:
            self.metrics.running.set(0)
