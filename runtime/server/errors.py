"""Every failure the service reports, in OpenAI's error shape: {"error": {message, type, param, code}}.

Clients built on the `openai` package map the status to an exception class and show `message`,
so the message names the problem and the field; a traceback never reaches the client.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

from zspa.errors import ZspaError


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_zspa_error(exc: ZspaError, param: str | None = None) -> APIError:
    """A request the pipeline refused is the client's error (400); anything else is the server's."""
    if exc.exit_code == 2:
        return invalid(str(exc), param)
    return APIError(500, f"the server cannot run this bundle: {exc}", type="server_error", code="bundle_error")


def timed_out(seconds: float) -> APIError:
    return APIError(504, f"request timed out after {seconds:g} s (server --request-timeout)", type="timeout",
                    code="timeout")


def image_memory_full() -> APIError:
    """What a request gets when the memory for requests waiting for the decoder is full."""
    return APIError(429, "the server is busy (its memory for requests waiting for the decoder is full, "
                    "--max-image-memory-mb); retry later", type="rate_limit_error", code="image_memory_full",
                    headers={"Retry-After": "1"})


INTERNAL = APIError(500, "internal server error; the server log has the details", type="server_error",
                    code="internal_error")


DRAIN_TIMED_OUT = APIError(503, "the server shut down before this answer was finished (its drain timed out); "
                           "retry", type="server_error", code="shutdown")
