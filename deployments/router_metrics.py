"""The router's metrics: API requests by tier and status, rejections by reason, client disconnects.

An ASGI middleware on the router's FastAPI app sees every response, including those FastAPI
answers itself (request validation, unknown routes), and every client that leaves early.
Recording happens once per request, when it ends.

NOTE: the metrics live in a module global set by the router's constructor (`install`): Serve
runs the FastAPI app as a frozen copy the deployment instance cannot reach, and the
middleware needs the tier names to keep the `tier` label bounded. One router per process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from deployments import metrics as m

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

UNKNOWN_TIER = "unknown"  # a path naming no configured tier (answered 404)
DISCONNECTED_STATUS = 499  # no response started: the client left first (nginx's convention)

# NOTE: Serve's own queue cap (`max_queued_requests`) answers 503, so 503 counts as overload.
REJECTION_REASONS: dict[int, str] = {
    400: "validation", 404: "validation", 405: "validation", 413: "validation", 422: "validation",
    401: "auth", 403: "auth",
    429: "overload", 503: "overload",
    408: "timeout", 504: "timeout",
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


_installed: RouterMetrics | None = None


def install(tiers: Iterable[str], default_tier: str) -> None:
    """Called by the router's constructor, in its replica."""
    global _installed
    _installed = RouterMetrics(tiers, default_tier)


class MetricsMiddleware:
    """`app.add_middleware(MetricsMiddleware)`; records nothing until `install()` was called."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics = _installed
        tier = metrics.tier_of(_app_path(scope)) if metrics is not None and scope["type"] == "http" else None
        if tier is None:
            await self.app(scope, receive, send)
            return
        status: int | None = None
        complete = disconnected = False

        async def watch_send(message: Message) -> None:
            nonlocal status, complete
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        async def watch_receive() -> Message:
            nonlocal disconnected
            message = await receive()
            if message["type"] == "http.disconnect" and not complete:
                disconnected = True
            return message

        try:
            await self.app(scope, watch_receive, watch_send)
        except asyncio.CancelledError:
            # Serve cancels the call when the client goes away.
            disconnected = disconnected or not complete
            raise
        except Exception:
            status = status or 500  # Starlette's outermost handler answers it
            raise
        finally:
            assert metrics is not None
            metrics.record(tier, status, disconnected)


def _app_path(scope: Scope) -> str:
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path
