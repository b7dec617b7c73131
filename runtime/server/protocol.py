"""The OpenAI chat-completions wire format: request validation and response bodies.

Requests are validated by pydantic with unknown fields refused (a silently ignored `tools` or
`response_format` would surprise); `keep` and `pruning_method` are zspa's own fields, `top_k`
and `ignore_eos` follow vLLM's extensions. Sampling defaults are OpenAI's (temperature 1).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from zspa.runtime.logprobs import MAX_TOP_LOGPROBS, TokenLogprob
from zspa.runtime.server.errors import invalid

# Bounds on what one request may ask for: each keeps the work per request proportional to limits
# the operator sets (body bytes, prompt tokens, max tokens), whatever the client sends.
MAX_MESSAGES = 64
MAX_PARTS = 64  # content parts in one message
MAX_STOP_CHARS = 256
MAX_STOPS = 4  # OpenAI's limit
MAX_NAME_CHARS = 256


_StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "4", "yes" and true-as-1.0 are refused


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] = "auto"


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[ContentPart], Field(max_length=MAX_PARTS)]
    name: str | None = Field(None, max_length=MAX_NAME_CHARS)


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    model: str = Field(max_length=MAX_NAME_CHARS)
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, le=2**31)
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=2**31)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: _StopString | Annotated[list[_StopString], Field(max_length=MAX_STOPS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = Field(None, max_length=MAX_NAME_CHARS)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    keep: float | None = Field(None, gt=0.0, le=1.0, description="fraction of the image's visual tokens kept")
    pruning_method: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> list[str]:
        return [stop] if isinstance(stop, str) else list(stop or [])

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalties(cls, value: float) -> float:
        if value != 0:
            raise ValueError("penalties are not supported; leave them at 0")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, top_logprobs: int | None, info: ValidationInfo) -> int | None:
        if top_logprobs is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return top_logprobs

    @property
    def logprob_count(self) -> int | None:
        """None without logprobs, else how many alternatives each token comes with."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def completion_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def parse_body(body: bytes) -> ChatCompletionRequest:
    """A request body → a validated request; malformed JSON, integers past Python's 4,300-digit
    conversion limit and lone surrogates (which no tokenizer encodes) are 400s naming the problem."""
    try:
        payload = json.loads(body)
        # A surrogate arrives as a \\uDxxx escape (JSON's `u` is lower-case), or as its UTF-8-style
        # bytes (0xED; json decodes with surrogatepass): only a body holding one is walked. One-byte
        # searches first: they are memchr, a 30 MB body's longer ones take 50 ms.
        maybe = b"\xed" in body or (b"\\" in body and (b"\\ud" in body or b"\\uD" in body))
        where = _lone_surrogate(payload) if maybe else None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise invalid(f"request body is not valid JSON ({exc})", code="invalid_json") from None
    except RecursionError:
        raise invalid("request body is nested too deeply", code="invalid_json") from None
    except ValueError as exc:  # "Exceeds the limit (4300 digits) for integer string conversion"
        raise invalid(f"request body has a number out of range ({exc})", code="invalid_json") from None
    if where is not None:
        raise invalid(f"{where or 'the body'}: text holds a lone UTF-16 surrogate (not a character)", where or None,
                      "invalid_json")
    return parse_request(payload)


def _lone_surrogate(value: Any, where: str = "") -> str | None:
    """The location of the first string holding a lone surrogate, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and _lone_surrogate(key) is not None:
            return where
        found = _lone_surrogate(item, f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}".lstrip("."))
        if found is not None:
            return found
    return None


def parse_request(payload: Any) -> ChatCompletionRequest:
    """Validates a decoded JSON body; the first problem becomes a 400 naming the field."""
    if not isinstance(payload, dict):
        raise invalid("the request body must be a JSON object")
    try:
        return ChatCompletionRequest.model_validate(payload)
    except ValidationError as exc:
        param, message = _first_problem(exc)
        raise invalid(f"{param}: {message}" if param else message, param) from None


def _first_problem(exc: ValidationError) -> tuple[str, str]:
    """The deepest error location as `messages[0].content[1].image_url.url`, without pydantic's
    union-branch labels, and its messages (several when each union branch failed there)."""
    located: dict[str, list[str]] = {}
    for error in exc.errors():
        parts: list[str | int] = []
        for item in error["loc"]:
            if isinstance(item, str) and ("[" in item or item.startswith("constrained-")
                                          or item in {"str", "int", "float", "bool"}):
                continue
            if parts and item == parts[-1]:  # a tagged union repeats the tag before the field of that name
                continue
            parts.append(item)
        param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")
        message = "unknown field" if error["type"] == "extra_forbidden" else error["msg"]
        located.setdefault(param, []).append(message.removeprefix("Value error, "))
    param = max(located, key=lambda name: name.count(".") + name.count("["))
    return param, "; or ".join(dict.fromkeys(located[param]))


def completion_id() -> str:
    return f"chatcmpl-{time.time_ns():x}"


def usage_body(stats) -> dict[str, int]:
    """OpenAI's usage block plus the visual tokens the image produced and the decoder saw.

    prompt_tokens counts what the decoder prefilled: the text and the kept visual tokens."""
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.tokens_generated,
        "total_tokens": stats.prompt_tokens + stats.tokens_generated,
        "visual_tokens_total": stats.visual_tokens_total,
        "visual_tokens_kept": stats.visual_tokens_kept,
    }


# OpenAI's stand-in for a log-probability of minus infinity (JSON has no infinities).
LOGPROB_FLOOR = -9999.0


def logprobs_body(entries: list[TokenLogprob] | None, token_text: Callable[[int], str]) -> dict[str, Any] | None:
    """OpenAI's choice `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}], "refusal"}."""
    if entries is None:
        return None

    def one(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_text(token_id)
        return {"token": text, "logprob": max(logprob, LOGPROB_FLOOR), "bytes": list(text.encode("utf-8"))}

    return {"content": [{**one(e.token_id, e.logprob), "top_logprobs": [one(i, lp) for i, lp in e.top]}
                        for e in entries], "refusal": None}


def completion_body(request_id: str, model: str, created: int, result,
                    token_text: Callable[[int], str]) -> dict[str, Any]:
    return {
        "id": request_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                     "finish_reason": result.finish_reason, "logprobs": logprobs_body(result.logprobs, token_text)}],
        "usage": usage_body(result.stats),
    }


def chunk_body(request_id: str, model: str, created: int, delta: dict[str, str] | None,
               finish_reason: str | None = None, usage: dict[str, int] | None = None,
               logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One `chat.completion.chunk`; the usage chunk (delta None) has no choices, as OpenAI sends it."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                         "logprobs": logprobs}]
    body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body

