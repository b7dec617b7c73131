"""What the service answers, as pydantic models: the OpenAPI document's response schemas are
generated from them (`openapi.py`), in OpenAI's shapes with zspa's additions, and the suite fuzzes
the running service against that document."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

_Byte = Annotated[int, Field(ge=0, le=255)]
_Count = Annotated[int, Field(ge=0)]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class Error(BaseModel):
    """Every refusal, in OpenAI's error shape."""

    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: _Count
    completion_tokens: _Count
    total_tokens: _Count
    visual_tokens_total: _Count | None = None
    visual_tokens_kept: _Count | None = None


class TokenLogprob(BaseModel):
    token: str
    logprob: float = Field(le=0)
    bytes: list[_Byte]


class AnswerTokenLogprob(TokenLogprob):
    top_logprobs: list[TokenLogprob]


class Logprobs(BaseModel):
    content: list[AnswerTokenLogprob]
    refusal: None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class Choice(BaseModel):
    index: Literal[0]
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: Logprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice] = Field(min_length=1, max_length=1)
    usage: Usage


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


class Status(BaseModel):
    status: str


RESPONSES = (Error, ChatCompletion, ModelList, Status)
