"""The router's metrics: API requests by tier and status, rejections by reason, client disconnects.

An ASGI middleware on the router's FastAPI app sees every response, including those FastAPI
and the other middlewares answer themselves (request validation, unknown routes, API keys,
body limits), and every client that leaves early. Recording happens once per request, when it
ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from ray.exceptions import TaskCancelledError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments import metrics as m

UNKNOWN_TIER = "unknown"  # a path naming no configured tier (answered 404)
DISCONNECTED_STATUS = 499  # no response started: the client left first (nginx's convention)

# The router's statuses (README, "Errors"): 429 is its admission control refusing a full tier;
# 503 a replica that drains, or an engine or replica that is gone.
REJECTION_REASONS: dict[int, str] = {
    400: "validation", 404: "validation", 405: "validation", 413: "validation", 422: "validation",
    401: "auth", 403: "auth",
    429: "overload",
    408: "timeout", 504: "timeout",
    503: "unavailable",
}


class RouterMetrics:
    def __init__(self, tiers: Iterable[str], default_tier: str) -> None:
        self.tiers = frozenset(tiers)
        self.default_tier = default_tier
        self._requests = m.create(m.HTTP_REQUESTS)
        self._rejections = m.create(m.REJECTIONS)
        self._disconnects = m.create(m.DISCONNECTS)

    def tier_of(self, path: str) -> str | None:
        """The tier an API path addresses; None for paths outside the tiers' API (`/health`)."""
        parts = path.strip("/").split("/")
        if parts[0] == "v1":
            return self.default_tier
        if len(parts) >= 2 and parts[1] in ("v1", "stats"):
            return parts[0] if parts[0] in self.tiers else UNKNOWN_TIER
        return None

    def record(self, tier: str, status: int | None, disconnected: bool) -> None:
        status = status or DISCONNECTED_STATUS
        self._requests.inc(tags={"tier": tier, "status_code": str(status)})
        if (reason := REJECTION_REASONS.get(status)) is not None:
            self._rejections.inc(tags={"tier": tier, "reason": reason})
        if disconnected:
            self._disconnects.inc(tags={"tier": tier})


class MetricsMiddleware:
    """`app.add_middleware(MetricsMiddleware, metrics=...)`, added last so it runs first.

    NOTE: `metrics` is a callable (None until the router is constructed): Serve serves a frozen
    copy of the FastAPI app, which the router's constructor cannot configure.
    """

    def __init__(self, app: ASGIApp, metrics: Callable[[], RouterMetrics | None]) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics = self.metrics()
        tier = metrics.tier_of(_app_path(scope)) if metrics is not None and scope["type"] == "http" else None
        if tier is None:
            await self.app(scope, receive, send)
            return
        status: int | None = None
        complete = disconnected = failed = False

        async def watch_send(message: Message) -> None:
            nonlocal status, complete
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        async def watch_receive() -> Message:
            nonlocal disconnected
            try:
                message = await receive()
            except TaskCancelledError:
                # NOTE: how Serve's receive reports a client gone while the router waited for its
                # body or its disconnect (the proxy's side of the request was cancelled; Serve maps
                # the other such case to a disconnect itself). Raised, it escaped a streaming
                # response's disconnect listener and Starlette logged a traceback for a client that
                # merely left.
                message = {"type": "http.disconnect"}
            if message["type"] == "http.disconnect" and not complete:
                disconnected = True
            return message

        try:
            await self.app(scope, watch_receive, watch_send)
        except (asyncio.CancelledError, TaskCancelledError):
            # Serve cancels the call when the client goes away: inside Ray's calls as a task
            # cancellation, elsewhere as asyncio's.
            disconnected = disconnected or not complete
            raise
        except Exception:
            failed = True
            status = status or 500  # Starlette's outermost handler answers it
            raise
        finally:
            # NOTE: a response that started and ended unfinished, without an error, lost its client,
            # however its stream was stopped: the cancellation above, the disconnect message, or
            # Starlette's task group ending quietly when the replica call under the stream was
            # cancelled first (Serve cancels the request's calls with it).
            disconnected = disconnected or (status is not None and not complete and not failed)
            assert metrics is not None
            metrics.record(tier, status, disconnected)


def _app_path(scope: Scope) -> str:
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path
