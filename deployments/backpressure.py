"""Admission control at the router: each tier takes at most `max_ongoing + max_queued` requests at
once; beyond that a request is refused with 429 and a `Retry-After` estimated from the queue,
before any tokenisation or engine work.

NOTE: the count is per router replica (the local config runs one). With N router replicas a tier
admits up to N times its limits; Serve's own `max_queued_requests` on the handle would be global
per caller too, but answers 503 without a Retry-After and only after the request was routed.
"""

from __future__ import annotations

import math
import time
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from deployments.errors import OpenAIError

_EWMA_WEIGHT = 0.2  # weight of the newest request's duration in the running mean


class AdmissionConfig(BaseModel):
    """A tier's limits at the router (config key `tiers.<name>.admission`)."""

    model_config = ConfigDict(extra="forbid")

    # Requests the tier serves at once (the engines' batches), and how many more may wait.
    max_ongoing: int = Field(256, ge=1)
    max_queued: int = Field(256, ge=0)
    # Retry-After before any request has finished (seconds, per queued request ahead).
    initial_request_seconds: float = Field(1.0, gt=0)
    # A request (streamed or not) still running after this long is ended with 408.
    request_timeout_s: float = Field(600.0, gt=0)


class Overloaded(OpenAIError):
    """429 with `Retry-After`, whichever handler renders it."""

    def __init__(self, tier: str, retry_after_s: int) -> None:
        super().__init__(429, f"Tier {tier!r} is overloaded; retry after {retry_after_s} s.",
                         code="queue_full")
        self.retry_after_s = retry_after_s

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return super().response({"Retry-After": str(self.retry_after_s), **(headers or {})})


class TierGate:
    """Counts a tier's requests in flight at this router and refuses those over its limits."""

    def __init__(self, tier: str, config: AdmissionConfig) -> None:
        self.tier = tier
        self.config = config
        self.in_flight = 0
        self._mean_seconds = config.initial_request_seconds

    @property
    def limit(self) -> int:
        return self.config.max_ongoing + self.config.max_queued

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the requests queued ahead of a newcomer, served
        `max_ongoing` at a time, each taking the recent mean duration."""
        ahead = max(self.in_flight - self.config.max_ongoing + 1, 1)
        return max(1, math.ceil(ahead / self.config.max_ongoing * self._mean_seconds))

    def admit(self) -> "Slot":
        """A held slot (release it when the response is over, streamed or not); raises Overloaded
        when the tier is full."""
        if self.in_flight >= self.limit:
            raise Overloaded(self.tier, self.retry_after())
        self.in_flight += 1
        return Slot(self)

    def _done(self, took: float) -> None:
        self.in_flight -= 1
        self._mean_seconds += _EWMA_WEIGHT * (took - self._mean_seconds)


class Slot:
    """One admitted request; `release()` is idempotent so every exit path may call it."""

    def __init__(self, gate: TierGate) -> None:
        self._gate: TierGate | None = gate
        self._start = time.monotonic()

    def release(self) -> None:
        if self._gate is not None:
            self._gate._done(time.monotonic() - self._start)
            self._gate = None
