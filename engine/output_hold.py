"""Holds a request's streamed outputs back so its reader gets several steps' tokens in one read.

A stream's first output and its last (finished, failed or aborted) go at once; the others wait
until the request's flush time: `SchedulerConfig.stream_flush_ms` after its previous delivery,
widened so that all the engine's requests together stay under `stream_max_messages_per_s`.
A request run `whole` (a non-streamed reply) gets everything in one delivery when it finishes.
The steps held for a request merge into one output (`RequestOutput.merge`), with each step's time.

NOTE: the engine core holds them, before they cross to the front: a held step then costs the
front nothing (no report to read, no event-loop or reader wake-up), where holding them in the
front still paid a hand-off and a wake-up per step and stream. On a host whose cores the step
threads share with the server, that per-step front work was ~10% of a core at any stream count.
Merged, a delivery is a handful of objects whatever the steps it holds, where one output a step
(with its choice, token list and text) made the core pickle, and the front unpickle and walk,
~5 objects per token.
"""

from __future__ import annotations

import math

from engine.config import SchedulerConfig
from engine.outputs import RequestOutput


def flush_interval(tuning: SchedulerConfig, num_requests: int) -> float:
    """Seconds between deliveries of a stream's outputs, with `num_requests` in the engine."""
    interval = tuning.stream_flush_ms / 1000
    if tuning.stream_max_messages_per_s is not None:
        interval = max(interval, num_requests / tuning.stream_max_messages_per_s)
    return interval


def _ends(out: RequestOutput) -> bool:
    return out.finished or out.error is not None


class OutputHold:
    def __init__(self) -> None:
        self._held: dict[str, list[RequestOutput]] = {}
        # Request id -> when its held outputs go next; a streamed request has none before its first
        # output (which then goes at once), a whole one has inf until it ends.
        self._due: dict[str, float] = {}

    def hold_whole(self, request_id: str) -> None:
        """Delivers this request's outputs only when it ends, all together."""
        self._due[request_id] = math.inf

    def take(self, outputs: list[RequestOutput], now: float, interval: float) -> list[RequestOutput]:
        """What to deliver after a step that made `outputs` (in order per request); holds the rest."""
        for out in outputs:
            held = self._held.setdefault(out.request_id, [])
            if held and held[-1].error is None and out.error is None:
                held[-1].merge(out)
            else:  # a failure stays an output of its own, after the tokens before it
                held.append(out)
            if _ends(out):
                self._due[out.request_id] = -math.inf
        ready: list[RequestOutput] = []
        for request_id in [r for r in self._held if self._due.get(r, -math.inf) <= now]:
            held = self._held.pop(request_id)
            ready += held
            if _ends(held[-1]):
                del self._due[request_id]
            else:
                self._due[request_id] = now + interval
        return ready

    def release(self, request_id: str) -> list[RequestOutput]:
        """Forgets an aborted request: its held outputs, to deliver before the abort's own."""
        self._due.pop(request_id, None)
        return self._held.pop(request_id, [])

    def __len__(self) -> int:
        """Requests with state here (tests check that nothing is left once they end)."""
        return len(self._due.keys() | self._held.keys())
