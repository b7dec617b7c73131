"""One pipeline, one worker thread, a bounded queue in front of it: continuous batching.

Up to `max_batch` requests decode together, one decoder call per step (`runtime/batching.py`).
Between steps the worker feeds at most `max_prefill_tokens` of prompts (waiting requests'
prefills, first come first, cut in chunks where longer: vLLM's chunked prefill; on a slot cache
the first chunks of several prompts admitted together share one call; their vision stage ran in
their own threads, `Pipeline.encode`), lets a request whose prefill is complete join the batch, and
drops rows that are done, stopped or cancelled; the others never wait for them longer than one
budget of prefill. The queue bounds how many may wait (past it the service answers 429); each
job carries a cancel flag that a disconnect or a timeout sets, checked every step. Events go
back to the request's event loop with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from zspa.errors import ZspaError
from zspa.runtime.batching import decode_rows
from zspa.runtime.pipeline import Pipeline, PrefillChunks, Request
from zspa.runtime.sequence import Sequence
from zspa.runtime.server.errors import INTERNAL, APIError, from_zspa_error
from zspa.runtime.server.image_memory import ImageMemory
from zspa.runtime.server.metrics import ServerMetrics
from zspa.runtime.vision_kinds import vision_kind

log = logging.getLogger("zspa.serve")


class QueueFull(Exception):
    def __init__(self, retry_after_s: int):
        super().__init__(f"queue full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclass
class Job:
    request: Request | None  # None once its images are dropped (after prefill)
    keep: float
    method: str
    stream: bool  # send ("delta", (text, logprobs)) events; a plain request waits for the result only
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = ""
    arrived: float = field(default_factory=time.monotonic)
    memory: ImageMemory | None = None  # where its images' bytes are reserved, until `drop_images`
    _images_lock: threading.Lock = field(default_factory=threading.Lock)

    def drop_images(self) -> None:
        """Prefilled, refused or gone: the request's images are no longer needed (idempotent)."""
        with self._images_lock:
            if self.memory is not None and self.request is not None:
                self.memory.release(self.request.image_bytes)
            self.memory, self.request = None, None

    def swap_request(self, encoded: Request) -> bool:
        """Holds `encoded` (the request after its vision stage) instead, its reserved bytes traded
        for the new ones; False if they do not fit under the bound. A job whose images were
        dropped meanwhile (its client left) stays dropped."""
        with self._images_lock:
            if self.request is None:
                return True
            if self.memory is not None and not self.memory.exchange(self.request.image_bytes, encoded.image_bytes):
                return False
            self.request = encoded
            return True

    def cancel(self, reason: str) -> None:
        if not self.cancelled.is_set():
            self.cancel_reason = reason
            self.cancelled.set()

    def emit(self, kind: str, value: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the request's loop is gone (server stopped): nobody is listening
            pass


@dataclass
class _Row:
    job: Job
    answer: Sequence
    admitted: float
    last_token: float  # when its latest token came (`zspa_inter_token_latency_seconds`)


@dataclass
class _Admission:
    """A job whose prefill is under way, in chunks, into its cache slot."""

    job: Job
    chunks: PrefillChunks
    slot: int


class Scheduler:
    def __init__(self, pipeline: Pipeline, max_queue: int, metrics: ServerMetrics, max_batch: int = 1,
                 max_prefill_tokens: int = 128):
        self.pipeline = pipeline
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens  # of prompts fed between two steps (at least one chunk)
        self._rows = decode_rows(pipeline.decoder, max_batch)  # refuses a bundle that cannot batch, at start-up
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._work, name="zspa-pipeline", daemon=True)
        self._service_s = 1.0  # moving average of a job's time in the batch, for Retry-After
        self.ready = threading.Event()
        self._cut: APIError | None = None  # set by `cut_all`: every job still running or waiting gets it
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

    def cut_all(self, error: APIError) -> None:
        """Ends every running and waiting job with `error` at the worker's next step (a drain that
        ran out of time): each stream gets an error event rather than a cut connection."""
        self._cut = error

    @property
    def problem(self) -> str | None:
        """Why this scheduler cannot serve (a failed warm-up, a dead worker), or None."""
        if self.failure:
            return self.failure
        if self.ready.is_set() and not self._thread.is_alive():
            return "the pipeline worker has stopped"
        return None

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def submit(self, job: Job) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(max(1, math.ceil(self._service_s * (self.depth + 1) / self.max_batch))) from None
        self.metrics.queue_depth.set(self.depth)

    def _work(self) -> None:
        try:
            if self._warmup:
                warm_up(self.pipeline)
            self.ready.set()
        except Exception as exc:  # a bundle that loads but cannot run: /health reports it
            log.exception("warm-up failed")
            self.failure = f"warm-up failed: {exc}"
            return
        rows: list[_Row] = []
        admissions: list[_Admission] = []  # prefills under way, first come first
        stopping = False
        while rows or admissions or not stopping:
            budget = self.max_prefill_tokens
            while budget > 0:
                stopping = self._admit_waiting(rows, admissions, stopping)
                if not admissions:
                    break
                fed, joined = self._feed(admissions, budget)
                budget -= max(fed, 1)
                rows += joined
            self.metrics.running.set(len(rows))
            if rows:
                rows = self._step(rows)
                self.metrics.running.set(len(rows))

    def _admit_waiting(self, rows: list[_Row], admissions: list[_Admission], stopping: bool) -> bool:
        """Starts the prefill of waiting jobs while a slot is free (blocking only when nothing runs);
        returns whether the queue said stop."""
        while not stopping and len(rows) + len(admissions) < self.max_batch and \
                len(admissions) < self._rows.max_prefills:
            try:
                job = self._queue.get(block=not rows and not admissions)  # wait only when idle
            except queue.Empty:
                break
            self.metrics.queue_depth.set(self.depth)
            if job is None:
                return True
            admission = self._admit(job)
            if admission is not None:
                admissions.append(admission)
        return stopping

    def _admit(self, job: Job) -> _Admission | None:
        """Starts a waiting job's prefill (its vision stage is done, or runs here): takes a free
        cache slot and splices its prompt; None if it ended instead."""
        try:
            if self._ended(job):
                return None
            self.metrics.queue_wait.observe(time.monotonic() - job.arrived)
            with self._errors_to(job):
                slot = self._rows.prepare(self.pipeline.decoder)
                try:
                    return _Admission(job, self.pipeline.start_prefill(job.request), slot)
                except Exception:
                    self._rows.release(slot)
                    raise
        finally:
            job.drop_images()  # the spliced prompt is all its prefill needs now
        return None

    def _feed(self, admissions: list[_Admission], budget: int) -> tuple[int, list[_Row]]:
        """Feeds prompts under way within `budget` tokens, in one decoder call: the first comer's
        next chunk, or the first chunks of several that have fed nothing yet when together they
        use more of the budget (`_first_chunks`). Removes the admissions that complete or end;
        returns the tokens fed and the rows that joined the batch."""
        for admission in [a for a in admissions if self._ended(a.job)]:
            self._rows.release(admission.slot)
            admissions.remove(admission)
        if not admissions:
            return 0, []
        group, length = self._first_chunks(admissions, budget)
        if len(group) > 1:
            try:
                self.pipeline.prefill_first_chunks([a.chunks for a in group], length, self._rows,
                                                   [a.slot for a in group])
            except Exception as exc:  # the call's prompts fail together; the service goes on
                for admission in group:
                    self._fail(admission.job, exc)
                    self._rows.release(admission.slot)
                    admissions.remove(admission)
                return 0, []
            fed = length * len(group)
        else:
            admission, fed = group[0], 0
            with self._errors_to(admission.job):
                self._rows.resume(admission.slot, admission.chunks.fed)
                fed = self.pipeline.prefill_chunk(admission.chunks, budget)
            if not fed:  # it failed (its client was told)
                self._rows.release(admission.slot)
                admissions.remove(admission)
                return 0, []
        joined = []
        for admission in [a for a in group if a.chunks.done]:
            admissions.remove(admission)
            row = self._join(admission)
            if row is not None:
                joined.append(row)
        return fed, joined

    def _first_chunks(self, admissions: list[_Admission], budget: int) -> tuple[list[_Admission], int]:
        """The prefills one call feeds, and the tokens each gets: the first comer alone, or the m
        first comers that have fed nothing and lie in consecutive slots, S tokens each, where
        S = min(budget // m, the shortest of their prompts) is a place each may end a chunk and
        m·S beats what the first comer alone takes."""
        head = admissions[0]
        best, length = [head], head.chunks.next_end(budget) - head.chunks.fed
        if head.chunks.fed or self._rows.max_prefills == 1:
            return best, length
        fresh = [a for a in admissions if not a.chunks.fed]
        for count in range(2, len(fresh) + 1):
            group = fresh[:count]
            slots = sorted(a.slot for a in group)
            size = min(budget // count, *(a.chunks.length for a in group))
            if slots != list(range(slots[0], slots[0] + count)) or size < 1:
                break
            if count * size > len(best) * length and all(size in a.chunks.ends for a in group):
                best, length = sorted(group, key=lambda a: a.slot), size
        return best, length

    def _join(self, admission: _Admission) -> _Row | None:
        """A complete prefill's first token; its row joins the batch unless that token ends it."""
        job = admission.job
        with self._errors_to(job):
            answer, logits = self.pipeline.finish_prefill(admission.chunks)
            job.emit("started")
            now = time.monotonic()
            row = _Row(job, answer, now, now)
            if self._take(row, logits):
                self._rows.add(self.pipeline.decoder, admission.slot)
                return row
        self._rows.release(admission.slot)
        return None

    def _ended(self, job: Job) -> bool:
        """Whether a job waiting for (or in) its prefill is over: cancelled (counted), or cut by a
        drain that ran out of time (told so)."""
        if job.cancelled.is_set():
            self.metrics.cancelled.labels(job.cancel_reason).inc()
            return True
        if self._cut is not None:
            job.emit("error", self._cut)
            return True
        return False

    @contextlib.contextmanager
    def _errors_to(self, job: Job) -> Iterator[None]:
        """Sends a failure of `job`'s own work to its client (a clear 4xx-style error, or an
        internal one, logged) and lets the worker go on."""
        try:
            yield
        except Exception as exc:
            self._fail(job, exc)

    @staticmethod
    def _fail(job: Job, exc: Exception) -> None:
        if isinstance(exc, ZspaError):
            job.emit("error", from_zspa_error(exc, "messages"))
        else:
            log.error("generation failed", exc_info=exc)
            job.emit("error", INTERNAL)

    def _step(self, rows: list[_Row]) -> list[_Row]:
        """One decoder call for every row; returns the rows that go on."""
        pipeline = self.pipeline
        try:
            logits = self._rows.step([row.answer.token for row in rows],
                                     pipeline.position_ids([row.answer.position for row in rows]))
        except Exception:  # the batch's cache is lost with it: every row fails, the service goes on
            log.exception("generation failed (a batch of %d)", len(rows))
            for row in rows:
                row.job.emit("error", INTERNAL)
            self._rows.remove(set(range(len(rows))))
            return []
        ended, now = set(), time.monotonic()
        for index, row in enumerate(rows):
            self.metrics.inter_token_latency.observe(now - row.last_token)
            row.last_token = now
            row.answer.advance()
            if not self._take(row, logits[index]):
                ended.add(index)
        self._rows.remove(ended)
        return [row for index, row in enumerate(rows) if index not in ended]

    def _take(self, row: _Row, logits) -> bool:
        """Hands a row its logits and its client the text; False once the row is over."""
        job, answer = row.job, row.answer
        delta = answer.accept(logits)
        if delta and job.stream:
            job.emit("delta", (delta, answer.take_logprobs()))
        if job.cancelled.is_set():
            self.metrics.cancelled.labels(job.cancel_reason).inc()
            return False
        if self._cut is not None and not answer.done:
            self.metrics.cancelled.labels("shutdown").inc()
            job.emit("error", self._cut)
            return False
        if not answer.done:
            return True
        tail, logprobs = answer.finish(), answer.take_logprobs()
        if job.stream and (tail or logprobs):
            job.emit("delta", (tail, logprobs))
        self.metrics.observe_generation(answer.result.stats, job.keep, job.method)
        job.emit("done", answer.result)
        self._service_s = 0.8 * self._service_s + 0.2 * (time.monotonic() - row.admitted)
        return False


def warm_up(pipeline: Pipeline) -> None:
    """One short generation per keep of every method, so the first request pays no first-run costs."""
    bundle = pipeline.bundle
    height, width = vision_kind(bundle.manifest.vision).warmup_size(bundle.manifest.vision)
    image = Image.new("RGB", (width, height), (128, 128, 128))
    settings = {(keep, method) for method in bundle.methods or [None] for keep in bundle.keeps(method)}
    for keep, method in sorted(settings, key=str):
        pipeline.generate(image, "warm up", keep=keep, method=method, max_new_tokens=2)
    log.info("warmed up %d setting(s)", len(settings))
