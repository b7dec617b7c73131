"""A validated chat request → what the pipeline takes: its preprocessed images, a templated prompt, options.

Everything here can fail on the client's input, so every error names the request field it came
from; it runs in a worker thread of the event loop (image decoding is CPU work).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from zspa.errors import InvalidInputError
from zspa.pruning.budget import validate_keep
from zspa.runtime.pipeline import Pipeline, PreparedImage, Request
from zspa.runtime.prompting import Prompt, PromptTooLong
from zspa.runtime.server.errors import image_memory_full, invalid, timed_out
from zspa.runtime.server.image_urls import image_bytes
from zspa.runtime.server.protocol import ChatCompletionRequest, Message
from zspa.runtime.server.scheduler import Job
from zspa.runtime.server.settings import ServerSettings


@dataclass(frozen=True)
class PreparedRequest:
    request: Request  # checked, its images preprocessed: the worker only prefills and decodes it
    keep: float
    method: str  # "none" when keep is 1.0


def prepare(request: ChatCompletionRequest, pipeline: Pipeline, settings: ServerSettings,
            image_slots: threading.Semaphore, deadline: float) -> PreparedRequest:
    """`image_slots` bounds the images decoded and preprocessed at once (each may take several
    bytes per pixel of --max-image-pixels), whatever the number of request threads; a request's
    images are fetched and decoded one after the other, and only their preprocessed pixels are
    kept; nothing here (a download, a wait for a slot) outlives the request's `deadline`
    (time.monotonic())."""
    messages, images = _transformers_messages(request.messages, settings.max_images)
    prompt = _prompt(pipeline, settings, messages)  # before any image is fetched: a bad prompt costs nothing
    keep, method = _pruning(request, pipeline)
    prepared_images = [_prepare_image(pipeline, settings, image_slots, deadline, param, url) for param, url in images]
    views = tuple(image.vision_input.views for image in prepared_images)
    if views != prompt.image_views:  # an image shown as several blocks (Gemma 3's pan&scan crops)
        prompt = _prompt(pipeline, settings, messages, views)
    options = {
        "keep": keep, "method": request.pruning_method,
        "max_new_tokens": request.completion_limit or settings.default_max_tokens,
        "temperature": request.temperature, "top_p": request.top_p, "top_k": request.top_k, "seed": request.seed,
        "stop": request.stop, "ignore_eos": request.ignore_eos, "logprobs": request.logprob_count,
    }
    try:
        prepared = pipeline.request(prepared_images, prompt, **options)
    except InvalidInputError as exc:
        raise invalid(str(exc), "messages") from None
    if prepared.image_bytes > settings.max_image_memory_bytes:
        raise invalid(f"the request's images take {prepared.image_bytes / 2**20:.0f} MB preprocessed, over the "
                      f"{settings.max_image_memory_bytes / 2**20:.0f} MB this server holds for images waiting for the "
                      "decoder (--max-image-memory-mb); send fewer or smaller images", "messages", "images_too_large")
    return PreparedRequest(prepared, keep, method)


def _prompt(pipeline: Pipeline, settings: ServerSettings, messages: list[dict[str, Any]],
            views: tuple[int, ...] | None = None) -> Prompt:
    try:
        return pipeline.prompts.build_chat(messages, *_token_limit(pipeline, settings), views=views)
    except PromptTooLong as exc:
        raise invalid(str(exc), "messages", "prompt_too_long") from None
    except InvalidInputError as exc:
        raise invalid(str(exc), "messages") from None


def encode(job: Job, pipeline: Pipeline, vision_slot: threading.Semaphore, deadline: float,
           settings: ServerSettings) -> None:
    """Runs a queued-to-be job's vision stage (vision, embed, prune) in this thread, one request at
    a time in `vision_slot`, and trades its images' reserved bytes for its kept tokens'."""
    if not vision_slot.acquire(timeout=max(0.0, deadline - time.monotonic())):
        raise timed_out(settings.request_timeout_s)
    try:
        request = job.request
        if request is None:  # its client left while it waited for the slot
            return
        encoded = pipeline.encode(request)
    except InvalidInputError as exc:
        raise invalid(str(exc), "messages") from None
    finally:
        vision_slot.release()
    if not job.swap_request(encoded):
        raise image_memory_full()


def _prepare_image(pipeline: Pipeline, settings: ServerSettings, image_slots: threading.Semaphore, deadline: float,
                   param: str, url: str) -> PreparedImage:
    """One image_url fetched or decoded from its data URL, then preprocessed, in an image slot."""
    data, formats = image_bytes(url, param, max_bytes=settings.max_image_bytes, remote=settings.fetch_policy,
                                deadline=deadline)
    if not image_slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
        raise timed_out(settings.request_timeout_s)
    try:
        return pipeline.prepare_image(data, formats, settings.max_image_pixels)
    except InvalidInputError as exc:
        raise invalid(str(exc).removeprefix("image bytes: "), param, "invalid_image") from None
    finally:
        image_slots.release()


def _token_limit(pipeline: Pipeline, settings: ServerSettings) -> tuple[int, str]:
    """The prompt's token bound and its name, for the refusal."""
    if settings.max_prompt_tokens and settings.max_prompt_tokens < pipeline.max_context:
        return settings.max_prompt_tokens, "server's limit (--max-prompt-tokens)"
    return pipeline.max_context, "context"


def _transformers_messages(messages: list[Message], max_images: int) -> tuple[list[dict[str, Any]],
                                                                              list[tuple[str, str]]]:
    """OpenAI messages → transformers chat messages, and (field, URL) of each image among them, in order."""
    converted, images = [], []
    for i, message in enumerate(messages):
        content = [{"type": "text", "text": message.content}] if isinstance(message.content, str) else []
        for j, part in enumerate([] if isinstance(message.content, str) else message.content):
            if part.type == "text":
                content.append({"type": "text", "text": part.text})
            else:
                content.append({"type": "image"})
                images.append((f"messages[{i}].content[{j}].image_url.url", part.image_url.url))
        role = "system" if message.role == "developer" else message.role
        converted.append({"role": role, "content": content})
    if len(images) > max_images:
        raise invalid(f"the messages carry {len(images)} images (image_url content parts, every turn counted); "
                      f"this server takes at most {max_images} (--max-images)", "messages", "too_many_images")
    return converted, images


def _pruning(request: ChatCompletionRequest, pipeline: Pipeline) -> tuple[float, str]:
    """The keep ratio and method the request runs at, checked against the bundle's pruners."""
    bundle = pipeline.bundle
    if request.pruning_method is not None:
        try:
            bundle.require_method(request.pruning_method)
        except InvalidInputError as exc:
            raise invalid(str(exc), "pruning_method") from None
    try:
        keep = bundle.keeps(request.pruning_method)[0] if request.keep is None else validate_keep(request.keep)
        pruner = bundle.pruner_for(keep, request.pruning_method)
    except InvalidInputError as exc:
        raise invalid(str(exc), "keep") from None
    return keep, pruner.method if pruner else "none"
