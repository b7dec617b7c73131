"""A validated chat request → what the pipeline takes: one preprocessed image, a templated prompt, options.

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
from zspa.runtime.images import load_image
from zspa.runtime.pipeline import Pipeline, Request
from zspa.runtime.prompting import PromptTooLong
from zspa.runtime.server.errors import invalid, timed_out
from zspa.runtime.server.image_urls import image_bytes
from zspa.runtime.server.protocol import ChatCompletionRequest, Message
from zspa.runtime.server.settings import ServerSettings


@dataclass(frozen=True)
class PreparedRequest:
    request: Request  # checked, its image preprocessed: the worker only prefills and decodes it
    keep: float
    method: str  # "none" when keep is 1.0


def prepare(request: ChatCompletionRequest, pipeline: Pipeline, settings: ServerSettings,
            image_slots: threading.Semaphore, deadline: float) -> PreparedRequest:
    """`image_slots` bounds the images decoded and preprocessed at once (each may take several
    bytes per pixel of --max-image-pixels), whatever the number of request threads; nothing here
    (a download, a wait for a slot) outlives the request's `deadline` (time.monotonic())."""
    messages, (param, url) = _transformers_messages(request.messages)
    try:
        prompt = pipeline.prompts.build_chat(messages, *_token_limit(pipeline, settings))
    except PromptTooLong as exc:
        raise invalid(str(exc), "messages", "prompt_too_long") from None
    except InvalidInputError as exc:
        raise invalid(str(exc), "messages") from None
    keep, method = _pruning(request, pipeline)
    data, formats = image_bytes(url, param, max_bytes=settings.max_image_bytes, remote=settings.fetch_policy,
                                deadline=deadline)
    options = {
        "keep": keep, "method": request.pruning_method,
        "max_new_tokens": request.completion_limit or settings.default_max_tokens,
        "temperature": request.temperature, "top_p": request.top_p, "top_k": request.top_k, "seed": request.seed,
        "stop": request.stop, "ignore_eos": request.ignore_eos,
    }
    if not image_slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
        raise timed_out(settings.request_timeout_s)
    try:
        try:
            image = load_image(data, max_pixels=settings.max_image_pixels, formats=formats)
        except InvalidInputError as exc:
            raise invalid(str(exc).removeprefix("image bytes: "), param, "invalid_image") from None
        try:
            prepared = pipeline.request(image, prompt, **options)
        except InvalidInputError as exc:
            raise invalid(str(exc), "messages") from None
    finally:
        image_slots.release()
    return PreparedRequest(prepared, keep, method)


def _token_limit(pipeline: Pipeline, settings: ServerSettings) -> tuple[int, str]:
    """The prompt's token bound and its name, for the refusal."""
    if settings.max_prompt_tokens and settings.max_prompt_tokens < pipeline.max_context:
        return settings.max_prompt_tokens, "server's limit (--max-prompt-tokens)"
    return pipeline.max_context, "context"


def _transformers_messages(messages: list[Message]) -> tuple[list[dict[str, Any]], tuple[str, str]]:
    """OpenAI messages → transformers chat messages, and (field, URL) of the one image among them."""
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
    if len(images) != 1:
        raise invalid(f"this model takes exactly one image per request (an image_url content part); "
                      f"found {len(images)}", "messages", "image_count")
    return converted, images[0]


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
