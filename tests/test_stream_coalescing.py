"""The replica's stream coalescing: what a tier's flush interval and message cap do to the
chunks a stream sends (deployments/replica.py), against a scripted engine stream."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from types import SimpleNamespace

from deployments.replica import ModelReplica, _coalesce
from engine.config import SchedulerConfig
from engine.outputs import ChoiceDelta, RequestOutput


def output(i: int, finished: bool = False) -> RequestOutput:
    return RequestOutput("r", [ChoiceDelta(0, [i], f"t{i}", finish_reason="length" if finished else None)],
                         finished, 3, 0, i + 1)


async def engine_stream(n: int, gap: float, closed: list[bool]) -> AsyncIterator[list[RequestOutput]]:
    """`n` steps `gap` seconds apart, one output each (the last finished); notes being closed."""
    try:
        for i in range(n):
            await asyncio.sleep(gap)
            yield [output(i, finished=i == n - 1)]
    finally:
        closed.append(True)


def chunks(n: int, gap: float, interval_of: object) -> tuple[list[list[int]], list[bool]]:
    closed: list[bool] = []

    async def run() -> list[list[int]]:
        return [[o.num_output_tokens - 1 for o in batch]
                async for batch in _coalesce(engine_stream(n, gap, closed), interval_of)]  # type: ignore[arg-type]

    return asyncio.run(run()), closed


def test_no_interval_sends_every_step_and_inf_sends_once() -> None:
    every, _ = chunks(5, 0.005, lambda: 0.0)
    assert every == [[0], [1], [2], [3], [4]]
    once, _ = chunks(5, 0.005, lambda: math.inf)
    assert once == [[0, 1, 2, 3, 4]]


def test_interval_groups_after_the_first_token_and_ends_at_once() -> None:
    got, closed = chunks(12, 0.01, lambda: 0.045)
    assert got[0] == [0]  # the first token is never held
    assert [t for c in got for t in c] == list(range(12))  # nothing lost or reordered
    assert len(got) <= 5 and max(len(c) for c in got[1:]) >= 3  # ~4 steps a chunk
    assert closed == [True]


def test_the_interval_is_asked_again_at_every_flush() -> None:
    """A cap that widens while a stream runs (more streams arrived) takes effect mid-stream."""
    calls = iter([0.015] * 4 + [10.0] * 100)
    got, _ = chunks(20, 0.005, lambda: next(calls))
    narrow, wide = got[:4], got[4:]
    assert all(len(c) <= 4 for c in narrow)
    assert len(wide) == 1 and wide[0][-1] == 19  # held until the stream ended, then sent at once


def test_leaving_early_closes_the_engine_stream() -> None:
    closed: list[bool] = []

    async def run() -> None:
        async for _ in _coalesce(engine_stream(100, 0.002, closed), lambda: 0.01):
            break

    asyncio.run(run())
    assert closed == [True]  # the engine aborts the request when its stream is closed


def test_message_cap_widens_the_flush_interval_with_the_streams() -> None:
    def interval(active: int, **tuning: float) -> float:
        replica = SimpleNamespace(engine=SimpleNamespace(tuning=SchedulerConfig(**tuning)),
                                  _active={f"r{i}" for i in range(active)})
        return ModelReplica.func_or_class._flush_interval(replica)

    assert interval(64, stream_flush_ms=0) == 0.0
    assert interval(1, stream_flush_ms=50, stream_max_messages_per_s=150) == 0.05
    assert interval(16, stream_flush_ms=50, stream_max_messages_per_s=150) == 16 / 150
    assert interval(64, stream_flush_ms=50, stream_max_messages_per_s=150) == 64 / 150
