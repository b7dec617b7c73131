"""The service's OpenAPI document (GET /openapi.json): the request schema is the one requests are
validated with (pydantic's), responses are described as they are sent, every error in OpenAI's
shape. Clients and API tooling read it; the suite fuzzes the service against it (schemathesis)."""

from __future__ import annotations

from typing import Any

from zspa.runtime.server.protocol import ChatCompletionRequest

_REF = "#/components/schemas/{model}"
_NULLABLE_STRING = {"type": ["string", "null"]}
_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"}, "param": _NULLABLE_STRING,
                   "code": _NULLABLE_STRING}}}}
_USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"], "properties": {
    name: {"type": "integer", "minimum": 0} for name in (
        "prompt_tokens", "completion_tokens", "total_tokens", "visual_tokens_total", "visual_tokens_kept")}}
_TOKEN_LOGPROB = {"type": "object", "required": ["token", "logprob", "bytes"], "properties": {
    "token": {"type": "string"}, "logprob": {"type": "number", "maximum": 0},
    "bytes": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255}}}}
_LOGPROBS = {"type": ["object", "null"], "required": ["content"], "properties": {
    "refusal": {"type": "null"}, "content": {"type": "array", "items": {
        **_TOKEN_LOGPROB, "required": ["token", "logprob", "bytes", "top_logprobs"],
        "properties": {**_TOKEN_LOGPROB["properties"], "top_logprobs": {"type": "array", "items": _TOKEN_LOGPROB}}}}}}
_COMPLETION = {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"], "properties": {
    "id": {"type": "string"}, "object": {"const": "chat.completion"}, "created": {"type": "integer"},
    "model": {"type": "string"}, "usage": {"$ref": "#/components/schemas/Usage"},
    "choices": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
        "type": "object", "required": ["index", "message", "finish_reason"], "properties": {
            "index": {"const": 0}, "finish_reason": {"enum": ["stop", "length"]}, "logprobs": _LOGPROBS,
            "message": {"type": "object", "required": ["role", "content"], "properties": {
                "role": {"const": "assistant"}, "content": {"type": "string"}}}}}}}}
_MODELS = {"type": "object", "required": ["object", "data"], "properties": {
    "object": {"const": "list"}, "data": {"type": "array", "items": {
        "type": "object", "required": ["id", "object", "created", "owned_by"], "properties": {
            "id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
            "owned_by": {"type": "string"}}}}}}
_TEXT = {"text/plain": {"schema": {"type": "string"}}}
_STATUS = {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}}

# Refusals any route may give (400: a Host the service does not answer), and those of /v1 routes.
_ANY_ROUTE = {"400": "bad request, or a Host header this server does not answer"}
_V1 = {**_ANY_ROUTE, "401": "missing or wrong API key"}
_CHAT = {**_V1, "404": "model not served here", "413": "body over --max-body-bytes",
         "415": "body is not application/json", "429": "queue full (Retry-After)",
         "503": "warming up, draining, or the model cannot run", "504": "over --request-timeout"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=name)}


def _json(schema: dict) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _errors(codes: dict[str, str]) -> dict[str, Any]:
    return {code: {"description": text, "content": _json({"$ref": "#/components/schemas/Error"})}
            for code, text in codes.items()}


def openapi_schema(title: str = "zspa-serve", version: str = "1") -> dict[str, Any]:
    request = ChatCompletionRequest.model_json_schema(ref_template=_REF)
    schemas = {**request.pop("$defs", {}), "ChatCompletionRequest": request, "Error": _ERROR, "Usage": _USAGE,
               "ChatCompletion": _COMPLETION, "ModelList": _MODELS, "Status": _STATUS}
    status = {"content": _json({"$ref": "#/components/schemas/Status"})}
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version,
                 "description": "OpenAI-compatible chat completions about images, pruning visual tokens per image."},
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": {
            "/v1/chat/completions": {"post": {
                "operationId": "createChatCompletion", "security": [{"bearer": []}, {}],
                "requestBody": {"required": True, "content": _json(_ref("ChatCompletionRequest"))},
                "responses": {"200": {"description": "the answer, or its event stream when `stream` is true",
                                      "content": {**_json({"$ref": "#/components/schemas/ChatCompletion"}),
                                                  "text/event-stream": {"schema": {"type": "string"}}}},
                              **_errors(_CHAT)}}},
            "/v1/models": {"get": {"operationId": "listModels", "security": [{"bearer": []}, {}], "responses": {
                "200": {"description": "the served model", "content": _json(_ref("ModelList"))},
                **_errors(_V1)}}},
            "/health": {"get": {"operationId": "health", "responses": {
                "200": {"description": "alive", **status}, "503": {"description": "the model failed", **status},
                **_errors(_ANY_ROUTE)}}},
            "/ready": {"get": {"operationId": "ready", "responses": {
                "200": {"description": "ready", **status},
                "503": {"description": "loading, draining or failed", **status}, **_errors(_ANY_ROUTE)}}},
            "/metrics": {"get": {"operationId": "metrics", "responses": {
                "200": {"description": "Prometheus text format", "content": _TEXT},
                **_errors(_ANY_ROUTE)}}},
            "/openapi.json": {"get": {"operationId": "openapi", "responses": {
                "200": {"description": "this document", "content": _json({"type": "object"})}, **_errors(_ANY_ROUTE)}}},
        },
    }
