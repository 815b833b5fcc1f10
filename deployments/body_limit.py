"""413 for request bodies over the configured size, checked before anything reads or parses them.

An ASGI middleware: a `Content-Length` over the limit is refused at once; a chunked body is
counted as it streams in and cut off at the limit, taken from a callable (the router's
validated config; Serve serves a frozen copy of the app, so no `app.state`).
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.errors import CarriedError, OpenAIError


def _error(limit: int) -> OpenAIError:
    return OpenAIError(413, f"Request body too large: the limit is {limit} bytes.", type="invalid_request_error",
                       code="request_too_large")


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, limit: Callable[[], int | None]) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.limit() if scope["type"] == "http" else None
        if limit is None:
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _error(limit).response()(scope, receive, send)
            return
        seen = 0

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # the same envelope, code included, as a Content-Length refusal
                    raise CarriedError(_error(limit))
            return message

        await self.app(scope, counted_receive, send)
