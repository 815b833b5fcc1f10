"""OpenAI's error envelope, `{"error": {"message", "type", "param", "code"}}`, for every failure.

One exception type carries a failure from wherever it is found to the HTTP layer, and the
handlers installed on the FastAPI app turn it, validation errors, unknown routes and
unexpected exceptions into the same envelope.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from deployments.protocol import ErrorInfo

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
          413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable_error"}
# Messages may quote client input (a model or tier name): bounded so error bodies stay small.
_MAX_MESSAGE = 1000
# Where FastAPI found a validation error; the field inside it is the `param`.
_LOCATIONS = ("body", "query", "path", "header")


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type: str | None = None, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPES.get(status, "internal_server_error")
        self.param = param
        self.code = code

    @classmethod
    def from_info(cls, info: ErrorInfo) -> "OpenAIError":
        return cls(info.status, info.message, info.type, info.param, info.code)

    def body(self) -> dict[str, Any]:
        message = self.message if len(self.message) <= _MAX_MESSAGE else self.message[:_MAX_MESSAGE] + "..."
        param = self.param if self.param is None or len(self.param) <= 100 else self.param[:100]
        return {"error": {"message": message, "type": self.type, "param": param, "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


class CarriedError(HTTPException):
    """An OpenAIError raised where only an HTTPException gets through (FastAPI re-raises those from
    its body parsing and turns others into a 400), rendered with its own type and code."""

    def __init__(self, error: OpenAIError) -> None:
        super().__init__(error.status, error.message)
        self.error = error


def internal_error() -> OpenAIError:
    """A bug: the details go to the log, never to the client (they may hold paths or input)."""
    return OpenAIError(500, "The server had an internal error; it has been logged.", code="internal_error")


def _validation_error(exc: RequestValidationError) -> OpenAIError:
    """FastAPI's 422 as OpenAI's 400; `param` is the offending field, else where it was (`body`)."""
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(part) for part in first.get("loc", ())]
    source = loc.pop(0) if loc and loc[0] in _LOCATIONS else "body"
    if first.get("type") == "json_invalid":
        loc = []  # the location is a character offset, not a field
    # pydantic names union members in the location (e.g. "str", "list[int]"); the field is the first part.
    param = loc[0] if loc else source
    where = ".".join(loc) or source
    # NOTE: pydantic's `msg` never quotes the input value; `input` and `ctx` are left out on purpose.
    return OpenAIError(400, f"{where}: {first.get('msg', 'invalid request')}", param=param)


def install_error_handlers(app: FastAPI) -> None:
    async def on_openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        error = exc.error if isinstance(exc, CarriedError) else OpenAIError(exc.status_code, str(exc.detail))
        return error.response()

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error serving %s", request.url.path)
        return internal_error().response()

    app.add_exception_handler(OpenAIError, on_openai_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
