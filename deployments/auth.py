"""API keys: `Authorization: Bearer <key>` on every route but the open ones (`/health`, `/metrics`).

Keys come from the config (`auth.api_keys`), an environment variable named there
(`auth.api_keys_env`, comma-separated) or a key file named there (`auth.api_key_file`, one key
a line, `#` comments); a key may be limited to some tiers. Nothing is ever committed as a
default: with no key configured the API is open and start-up logs a loud warning.

The check is an ASGI middleware on the router's FastAPI app, so every route, present and
future (the OpenAPI document included), is guarded without each handler remembering to ask.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from deployments.errors import OpenAIError

log = logging.getLogger("ray.serve")

OPEN_PATHS = frozenset({"/health", "/metrics"})


# NOTE: SecretStr and hidden inputs: a key never shows in a repr, a validation error or a logged config.
Key = Annotated[SecretStr, Field(min_length=16)]
_SECRET = ConfigDict(extra="forbid", hide_input_in_errors=True)


class ApiKeyEntry(BaseModel):
    """A key, and the tiers it may use (None = all)."""

    model_config = _SECRET

    key: Key
    tiers: list[str] | None = None


class AuthConfig(BaseModel):
    model_config = _SECRET

    api_keys: list[Key | ApiKeyEntry] = []
    api_keys_env: str | None = None
    api_key_file: Path | None = None

    def entries(self) -> list[ApiKeyEntry]:
        """Every configured key; reads the environment variable and the key file named here."""
        entries = [e if isinstance(e, ApiKeyEntry) else ApiKeyEntry(key=e) for e in self.api_keys]
        if self.api_keys_env is not None:
            raw = os.environ.get(self.api_keys_env)
            if raw is None:
                raise ValueError(f"auth.api_keys_env: environment variable {self.api_keys_env} is not set")
            entries += [ApiKeyEntry(key=SecretStr(k.strip())) for k in raw.split(",") if k.strip()]
        if self.api_key_file is not None:
            path = self.api_key_file.expanduser()
            try:
                lines = path.read_text().splitlines()
            except OSError as err:
                raise ValueError(f"auth.api_key_file: cannot read the key file ({err.strerror})") from None
            entries += [ApiKeyEntry(key=SecretStr(line.strip())) for line in lines
                        if line.strip() and not line.lstrip().startswith("#")]
        return entries


@dataclass(frozen=True)
class _Key:
    secret: bytes
    tiers: frozenset[str] | None


class ApiKeyGuard:
    """Decides one request: raises OpenAIError (401 / 403) or returns."""

    def __init__(self, entries: list[ApiKeyEntry], default_tier: str) -> None:
        self._keys = [_Key(e.key.get_secret_value().encode(), None if e.tiers is None else frozenset(e.tiers))
                      for e in entries]
        self._default_tier = default_tier
        if not self._keys:
            log.warning("!" * 72 + "\nNO API KEYS CONFIGURED: every route is open to anyone who can reach "
                        "this server.\nSet auth.api_keys, auth.api_keys_env or auth.api_key_file.\n" + "!" * 72)
        else:
            log.info("API keys: %d configured", len(self._keys))

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def tier_of(self, path: str) -> str | None:
        """The tier a path addresses (`/v1/...` = the default tier), if any."""
        parts = path.strip("/").split("/")
        if not parts[0]:
            return None
        return self._default_tier if parts[0] == "v1" else parts[0]

    def check(self, authorization: str | None, path: str) -> None:
        if not self._keys or path in OPEN_PATHS:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise OpenAIError(401, "Missing API key: send `Authorization: Bearer <key>`.",
                              type="authentication_error", code="missing_api_key")
        given = token.strip().encode("utf-8", "replace")
        # NOTE: constant time over all keys: every key is compared (no early exit), so the time
        # taken says neither which key matched nor how much of a key was right.
        matched: _Key | None = None
        for key in self._keys:
            if hmac.compare_digest(given, key.secret):
                matched = key
        if matched is None:
            # The given key is never echoed: the message is the same for every wrong key.
            raise OpenAIError(401, "Incorrect API key provided.", type="authentication_error",
                              code="invalid_api_key")
        tier = self.tier_of(path)
        if matched.tiers is not None and tier is not None and tier not in matched.tiers:
            raise OpenAIError(403, f"This API key may not use tier {tier!r}.", type="permission_error",
                              code="tier_not_allowed")


class ApiKeyMiddleware:
    """Runs the guard before any route; fails closed while there is none.

    NOTE: the guard comes from a callable, not from `app.state`: Serve's ingress serves a frozen
    copy of the FastAPI app, which the router's constructor cannot reach.
    """

    def __init__(self, app: ASGIApp, guard: Callable[[], ApiKeyGuard | None]) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        guard = self.guard()
        headers: dict[bytes, bytes] = dict(scope.get("headers") or [])
        authorization = headers.get(b"authorization")
        try:
            if guard is None:
                raise OpenAIError(503, "The server is starting.", code="starting")
            guard.check(None if authorization is None else authorization.decode("latin-1"), scope["path"])
        except OpenAIError as err:
            response: Any = err.response(
                {"WWW-Authenticate": "Bearer"} if err.status == 401 else None)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
