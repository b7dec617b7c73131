"""The HTTP surface of `zspa-serve`: OpenAI chat completions, models, health, readiness, metrics.

Bodies are read and validated by hand rather than by FastAPI's parameter injection, so that
size limits apply before parsing and every refusal is a 400 in OpenAI's error shape, not a 422.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from zspa.manifest import MANIFEST_NAME
from zspa.runtime.batching import batch_size
from zspa.runtime.pipeline import Pipeline
from zspa.runtime.server.conversation import encode, prepare
from zspa.runtime.server.errors import INTERNAL, APIError, image_memory_full, timed_out
from zspa.runtime.server.image_memory import ImageMemory
from zspa.runtime.server.metrics import ServerMetrics
from zspa.runtime.server.openapi import openapi_schema
from zspa.runtime.server.protocol import (
    chunk_body,
    completion_body,
    completion_id,
    logprobs_body,
    parse_body,
    usage_body,
)
from zspa.runtime.server.scheduler import Job, QueueFull, Scheduler
from zspa.runtime.server.settings import ServerSettings

log = logging.getLogger("zspa.serve")
ROUTES = ("/v1/chat/completions", "/v1/models", "/health", "/ready", "/metrics", "/openapi.json")
_DISCONNECT_POLL_S = 0.25
_CANNOT_RUN = "the model cannot run; the server log has the details"


class StatusCounter:
    """ASGI middleware counting responses by route and status, streaming ones included."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def recording_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"
            self.metrics.requests.labels(route, str(status)).inc()


class InternalErrors:
    """ASGI middleware answering an unexpected exception with OpenAI's 500 shape, details in the
    log. Inside the app rather than Starlette's `exception_handler(Exception)`, which re-raises
    after answering, so uvicorn closes the keep-alive connection and a pooled client's next
    request on it is reset; here the 500 is a complete response and the connection lives on."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # noqa: BLE001 (the whole point: nothing unexpected reaches uvicorn)
            log.error("unhandled error on %s", scope["path"], exc_info=exc)
            if started:  # a stream cut short: uvicorn closes the connection, as it must
                raise
            await INTERNAL.response()(scope, receive, send)


class HostCheck:
    """ASGI middleware refusing requests whose Host header names no allowed host (DNS rebinding: a
    web page whose name resolves to 127.0.0.1 would otherwise reach a loopback-only service)."""

    def __init__(self, app, allowed: frozenset[str] | None):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.allowed is None:
            return await self.app(scope, receive, send)
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        if host_name(host) in self.allowed:
            return await self.app(scope, receive, send)
        error = APIError(400, f"Host {host!r} is not served here (zspa-serve --allowed-hosts)", code="invalid_host")
        await error.response()(scope, receive, send)


def host_name(host: str) -> str:
    """The name in a Host header without its port: 'localhost:8000' → 'localhost', '[::1]:80' → '::1';
    anything after ']' but a port leaves the header whole, so it matches no allowed name."""
    host = host.strip().lower()
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        return name if rest == "" or (rest.startswith(":") and rest[1:].isdigit()) else host
    if host.count(":") != 1:  # no port, or a bare IPv6 address
        return host
    name, _, port = host.partition(":")
    return name if port.isdigit() or not port else host


def create_app(pipeline: Pipeline, settings: ServerSettings) -> FastAPI:
    metrics = ServerMetrics(keeps={keep for method in pipeline.bundle.methods
                                   for keep in pipeline.bundle.keeps(method)})
    image_slots = threading.BoundedSemaphore(settings.max_concurrent_images)
    # One request's vision stage at a time, each in its own thread: the decoding worker only prefills.
    vision_slot = threading.BoundedSemaphore(1)
    image_memory = ImageMemory(settings.max_image_memory_bytes)
    scheduler = Scheduler(pipeline, settings.max_queue, metrics, batch_size(pipeline.decoder, settings.max_batch),
                          settings.max_prefill_tokens)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start(settings.warmup)
        yield
        scheduler.stop()

    app = FastAPI(title="zspa-serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.draining = False
    app.state.scheduler = scheduler
    app.add_middleware(InternalErrors)
    app.add_middleware(HostCheck, allowed=settings.allowed_hosts)
    app.add_middleware(StatusCounter, metrics=metrics)  # added last, so it also counts HostCheck's refusals

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", type=kind).response()

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        if scheduler.problem:  # its text (an onnxruntime error, paths) is for the log, not for any caller
            return JSONResponse({"status": "error", "error": _CANNOT_RUN}, status_code=503)
        return {"status": "ok"}

    @app.api_route("/ready", methods=["GET", "HEAD"])
    async def ready():
        state = ("error" if scheduler.problem else "draining" if app.state.draining
                 else "ready" if scheduler.ready.is_set() else "loading")
        return JSONResponse({"status": state}, status_code=200 if state == "ready" else 503)

    @app.get("/metrics")
    async def metrics_endpoint(request: Request):
        if settings.metrics_key is not None:
            _require_key(request, settings.metrics_key)
        metrics.queue_depth.set(scheduler.depth)
        # Rendering takes the registry's locks and walks every series: off the event loop, so that
        # scrapes cannot delay requests.
        return Response(await run_in_threadpool(metrics.render), media_type=metrics.content_type)

    schema = openapi_schema()

    @app.get("/openapi.json")
    async def openapi():
        return schema

    @app.get("/v1/models")
    async def models(request: Request):
        _authorize(request, settings)
        manifest = pipeline.bundle.manifest
        return {"object": "list", "data": [{
            "id": settings.model_name, "object": "model", "created": _published(pipeline.bundle), "owned_by": "zspa",
            "source": manifest.source.model_id, "visual_tokens": manifest.vision.num_tokens,
            "pruning": {method: pipeline.bundle.keeps(method) for method in pipeline.bundle.methods},
        }]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        arrived = time.monotonic()
        _authorize(request, settings)
        _require_json(request)
        _require_serving(app, scheduler)
        deadline = arrived + settings.request_timeout_s
        raw = await _within(deadline, settings, _read_body(request, settings.max_body_bytes))
        body = await run_in_threadpool(parse_body, raw)  # a 32 MiB body parses off the event loop
        if body.model != settings.model_name:
            raise APIError(404, f"model {body.model!r} is not served here; this server serves "
                           f"{settings.model_name!r} (GET /v1/models)", param="model", code="model_not_found")
        # Image download and decoding run in a thread: the client gets its 504 at the deadline.
        prepared = await _within(deadline, settings, run_in_threadpool(prepare, body, pipeline, settings, image_slots,
                                                                   deadline))
        if not image_memory.reserve(prepared.request.image_bytes):  # on the loop: a late thread reserves nothing
            raise image_memory_full()
        job = Job(prepared.request, prepared.keep, prepared.method, body.stream, asyncio.get_running_loop(),
                  arrived=arrived, memory=image_memory)
        del prepared  # the job holds the images now, and drops them once prefilled
        try:  # vision, embed, prune here: the decoding worker then only splices and prefills
            await _within(deadline, settings, run_in_threadpool(encode, job, pipeline, vision_slot, deadline,
                                                                settings))
        except BaseException:
            job.drop_images()
            raise
        try:
            scheduler.submit(job)
        except QueueFull as full:
            job.drop_images()
            raise APIError(429, f"the server is busy ({settings.max_queue} requests queued); retry after "
                           f"{full.retry_after_s} s", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(full.retry_after_s)}) from None
        request_id, created = completion_id(), int(time.time())
        try:
            kind, value = await _next_event(job, deadline, settings, request)  # started, or refused
            if kind == "error":
                raise value
            if body.stream:
                events = _sse(job, deadline, settings, request_id, created, body.include_usage_in_stream,
                              pipeline.prompts.token_text if body.logprobs else None)
                return StreamingResponse(events, media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            event = await _next_event(job, deadline, settings, request)
        except BaseException:
            job.cancel("disconnect")  # no effect when a timeout already cancelled it
            raise
        kind, value = event
        if kind == "error":
            raise value
        return completion_body(request_id, settings.model_name, created, value, pipeline.prompts.token_text)

    return app


def _authorize(request: Request, settings: ServerSettings) -> None:
    if settings.api_key is not None:
        _require_key(request, settings.api_key)


def _require_key(request: Request, key: str) -> None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def _require_json(request: Request) -> None:
    """JSON bodies only: a web page can POST text/plain or a form to any address without asking,
    but not application/json."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise APIError(415, f"Content-Type must be application/json, got {media_type or 'none'!r}",
                       code="unsupported_media_type")


def _require_serving(app: FastAPI, scheduler: Scheduler) -> None:
    if app.state.draining:
        raise APIError(503, "the server is shutting down", type="server_error", code="draining")
    if scheduler.problem:
        raise APIError(503, _CANNOT_RUN, type="server_error", code="not_ready")
    if not scheduler.ready.is_set():
        raise APIError(503, "the model is still warming up; poll GET /ready", type="server_error", code="not_ready",
                       headers={"Retry-After": "1"})


async def _within(deadline: float, settings: ServerSettings, work):
    """`work` (a coroutine), or a 504 once the request's deadline passes: a client dripping its
    body, or an image that is slow to fetch or decode, cannot hold the request past its limit."""
    try:
        return await asyncio.wait_for(work, max(0.0, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        raise timed_out(settings.request_timeout_s) from None


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused past `limit` bytes whatever Content-Length claims."""
    declared = request.headers.get("content-length", "")
    too_large = APIError(413, f"request body is over the {limit:,}-byte limit (server --max-body-bytes)",
                         code="body_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
    except ClientDisconnect:
        raise APIError(499, "client closed the request", code="client_closed") from None
    return bytes(body)


async def _next_event(job: Job, deadline: float, settings: ServerSettings, request: Request | None = None):
    """The worker's next event for `job`; cancels the job on timeout, or on a disconnect when
    `request` is given (a streaming response learns of disconnects by being cancelled instead)."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            job.cancel("timeout")
            raise timed_out(settings.request_timeout_s)
        if not job.events.empty():  # under load the next event is usually there: no timer task for it
            return job.events.get_nowait()
        wait = min(remaining, _DISCONNECT_POLL_S) if request is not None else remaining
        try:
            return await asyncio.wait_for(job.events.get(), wait)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11 (JetPack 6 has 3.10)
            if request is not None and await request.is_disconnected():
                job.cancel("disconnect")
                raise APIError(499, "client closed the request", code="client_closed") from None


async def _sse(job: Job, deadline: float, settings: ServerSettings, request_id: str, created: int,
               include_usage: bool, token_text: Callable[[int], str] | None) -> AsyncIterator[str]:
    """OpenAI's chunk stream: a role chunk, content deltas (each with its tokens' logprobs when
    `token_text` is given), a finish chunk, usage if asked, [DONE]. An error after the headers went
    out is sent as an `{"error": ...}` event, as OpenAI does."""

    def event(payload) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def chunk(delta, finish_reason=None, usage=None, logprobs=None) -> str:
        body = logprobs_body(logprobs, token_text) if token_text is not None and logprobs is not None else None
        return event(chunk_body(request_id, settings.model_name, created, delta, finish_reason, usage, body))

    try:
        yield chunk({"role": "assistant", "content": ""})
        pending = None
        while True:
            try:
                kind, value = pending or await _next_event(job, deadline, settings)
            except APIError as error:
                yield event(error.body())
                return
            pending = None
            if kind == "delta":
                text, logprobs = value
                while not job.events.empty():  # deltas the client has not taken yet leave as one chunk
                    pending = job.events.get_nowait()
                    if pending[0] != "delta":
                        break
                    text, logprobs, pending = text + pending[1][0], logprobs + pending[1][1], None
                yield chunk({"content": text}, logprobs=logprobs)
            elif kind == "error":
                yield event(value.body())
                return
            else:
                yield chunk({}, value.finish_reason)
                if include_usage:
                    yield chunk(None, usage=usage_body(value.stats))
                yield "data: [DONE]\n\n"
                return
    finally:
        job.cancel("disconnect")  # no effect once the job has finished


def _published(bundle) -> int:
    """OpenAI's `created`: when the export published the bundle (the manifest carries no time, so
    that two exports of one model are byte-identical)."""
    return int((bundle.path / MANIFEST_NAME).stat().st_mtime)
