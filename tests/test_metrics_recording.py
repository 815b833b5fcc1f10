"""What the replica and the router record, against stand-in metric objects (no Ray): latencies
from engine outputs, finish reasons including aborts and failures, engine-statistic deltas, and
the router's status codes, rejection reasons and client disconnects."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from ray.exceptions import TaskCancelledError

from deployments import metrics as m
from deployments.replica_metrics import ReplicaMetrics
from deployments.router_metrics import MetricsMiddleware, RouterMetrics
from engine.outputs import (
    ChoiceDelta,
    EngineStats,
    RequestError,
    RequestFailedError,
    RequestOutput,
)


@dataclass
class FakeMetric:
    spec: m.MetricSpec
    default_tags: dict[str, str]
    buckets: Any
    calls: list[tuple[str, float, dict[str, str]]] = field(default_factory=list)

    def _record(self, kind: str, value: float, tags: dict[str, str] | None) -> None:
        self.calls.append((kind, value, {**self.default_tags, **(tags or {})}))

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        assert value > 0  # as Ray insists
        self._record("inc", value, tags)

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self._record("set", value, tags)

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self._record("observe", value, tags)

    def values(self) -> list[float]:
        return [v for _, v, _ in self.calls]

    def by(self, label: str) -> dict[str, float]:
        totals: dict[str, float] = {}
        for _, value, tags in self.calls:
            totals[tags[label]] = totals.get(tags[label], 0) + value
        return totals


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> dict[str, FakeMetric]:
    created: dict[str, FakeMetric] = {}

    def create(spec: m.MetricSpec, default_tags: dict[str, str] | None = None, buckets: Any = None) -> FakeMetric:
        created[spec.name] = FakeMetric(spec, dict(default_tags or {}), buckets)
        return created[spec.name]

    monkeypatch.setattr(m, "create", create)
    return created


def stats(**changes: Any) -> EngineStats:
    base = EngineStats(num_waiting=0, num_running=0, kv_blocks_used=0, kv_blocks_total=10, kv_capacity_tokens=160,
                       prefix_cache_queries=0, prefix_cache_hits=0, num_preemptions=0, prompt_tokens_total=0,
                       generation_tokens_total=0, steps_total=0, last_step_seconds=0.0, last_batch_tokens=0,
                       last_batch_seqs=0, expert_tokens=[[0, 0], [0, 0]])
    return replace(base, **changes)


def output(finish: str | None = None, index: int = 0, queue_time: float | None = 0.25) -> RequestOutput:
    return RequestOutput("r", [ChoiceDelta(index, [1], "x", finish_reason=finish)], finished=finish is not None,
                         num_prompt_tokens=7, num_cached_tokens=0, num_output_tokens=3, queue_time=queue_time)


async def engine_stream(items: list[RequestOutput | BaseException],
                        gap: float = 0.02) -> AsyncIterator[list[RequestOutput]]:
    """As `AsyncEngine.stream` hands outputs over: one step's output per read here, made as it is read."""
    for item in items:
        await asyncio.sleep(gap)
        if isinstance(item, BaseException):
            raise item
        yield [replace(item, step_times=[time.monotonic()])]


# ---- the replica ---------------------------------------------------------------------------------
def test_replica_records_latencies_and_finish_reasons(registry: dict[str, FakeMetric]) -> None:
    async def run() -> None:
        metrics = ReplicaMetrics("fixed-latency", stats, m.histogram_buckets([m.tier_targets(50, None)]), 3600)
        async with aclosing(metrics.track(engine_stream([output(), output(), output("length")]), 1)) as outs:
            assert len([o async for o in outs]) == 3
        # The client leaves after the first token: the rest of the request is an abort.
        async with aclosing(metrics.track(engine_stream([output(), output(), output("stop")]), 2)) as outs:
            await anext(outs)
        with pytest.raises(RequestFailedError):
            async for _ in metrics.track(engine_stream([output(), RequestFailedError("boom")]), 1):
                pass
        with pytest.raises(RequestError):  # refused up front: not a finished request
            async for _ in metrics.track(engine_stream([RequestError("too long")]), 1):
                pass
        assert not registry[m.TTFT.name].calls  # nothing recorded until the flush
        await metrics.flush()

    asyncio.run(run())
    assert 0.05 in registry[m.ITL.name].buckets  # the tier's ITL target is a bucket
    ttft, itl, e2e = (registry[s.name].values() for s in (m.TTFT, m.ITL, m.E2E))
    assert len(ttft) == 3 and all(0.015 < t < 1 for t in ttft)
    assert len(itl) == 2 and all(0.015 < t < 1 for t in itl)  # the first request's 2 gaps
    assert len(e2e) == 1 and e2e[0] > ttft[0] + sum(itl[:2]) - 0.01
    assert registry[m.QUEUE_TIME.name].values() == [0.25] * 3
    assert registry[m.REQUEST_PROMPT_TOKENS.name].values() == [7]
    assert registry[m.REQUEST_GENERATION_TOKENS.name].values() == [3]
    assert registry[m.REQUEST_SUCCESS.name].by("finished_reason") == {"length": 1, "abort": 2, "error": 1}
    assert all(tags["tier"] == "fixed-latency" for _, _, tags in registry[m.TTFT.name].calls)


def test_replica_exports_engine_statistics_as_deltas(registry: dict[str, FakeMetric]) -> None:
    current = [stats(prompt_tokens_total=5, expert_tokens=[[1, 0], [0, 0]])]

    async def run() -> None:
        metrics = ReplicaMetrics("latency", lambda: current[0], {}, 3600)
        current[0] = stats(num_running=2, num_waiting=1, kv_blocks_used=4, prompt_tokens_total=12,
                           generation_tokens_total=3, num_preemptions=0, steps_total=4, last_step_seconds=0.01,
                           last_batch_seqs=2, last_batch_tokens=9, expert_tokens=[[4, 2], [3, 3]])
        await metrics.flush()
        current[0] = replace(current[0], generation_tokens_total=5, steps_total=6)
        await metrics.flush()

    asyncio.run(run())
    assert registry[m.PROMPT_TOKENS.name].values() == [7]  # since the replica started, not since the engine did
    assert registry[m.GENERATION_TOKENS.name].values() == [3, 2]
    assert registry[m.STEPS.name].values() == [4, 2]
    assert not registry[m.PREEMPTIONS.name].calls  # Ray refuses an increment of 0
    assert registry[m.RUNNING.name].values() == [2, 2] and registry[m.WAITING.name].values() == [1, 1]
    assert registry[m.KV_USAGE.name].values() == [0.4, 0.4]
    assert registry[m.BATCH_SIZE.name].values()[-1] == 2 and registry[m.BATCH_TOKENS.name].values()[-1] == 9
    experts = {(t["layer"], t["expert"]): v for _, v, t in registry[m.EXPERT_TOKENS.name].calls}
    assert experts == {("0", "0"): 3, ("0", "1"): 2, ("1", "0"): 3, ("1", "1"): 3}


def test_replica_flushes_periodically(registry: dict[str, FakeMetric]) -> None:
    async def run() -> None:
        metrics = ReplicaMetrics("latency", lambda: stats(num_running=1), {}, interval=0.05)
        long_request = [output() for _ in range(300)] + [output("length")]
        async for _ in metrics.track(engine_stream(long_request, gap=0), 1):
            pass
        await asyncio.sleep(0.3)  # asyncio.run cancels the flush task when it returns

    asyncio.run(run())
    assert len(registry[m.RUNNING.name].calls) >= 3
    assert len(registry[m.ITL.name].calls) == 300  # recorded in slices, none lost


# ---- the router ----------------------------------------------------------------------------------
class Body(BaseModel):
    max_tokens: int


def router_app(metrics: RouterMetrics) -> FastAPI:
    app = FastAPI()
    app.add_middleware(MetricsMiddleware, metrics=lambda: metrics)

    @app.post("/{tier}/v1/completions")
    @app.post("/v1/completions")
    async def completions(body: Body, tier: str | None = None) -> dict[str, int]:
        if tier == "overloaded":
            raise ValueError("unexpected")
        return {"max_tokens": body.max_tokens}

    @app.get("/{tier}/v1/stream")
    async def stream(tier: str, cut: bool = False, inner: bool = False) -> StreamingResponse:
        async def chunks() -> AsyncIterator[str]:
            while True:
                yield "data: x\n\n"
                await asyncio.sleep(0.01)
                if cut:  # how a call into another replica ends when Serve cancels this one
                    raise TaskCancelledError()
                if inner:  # the replica call under the stream, cancelled with the request before it
                    raise asyncio.CancelledError()

        return StreamingResponse(chunks(), media_type="text/event-stream")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


@pytest.fixture
def router(registry: dict[str, FakeMetric]) -> FastAPI:
    return router_app(RouterMetrics(["latency", "throughput", "fixed-latency", "overloaded"], "latency"))


def scope(method: str, path: str) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
            "query_string": b"", "headers": [(b"content-type", b"application/json")], "server": ("test", 80),
            "client": ("c", 1)}


async def call(app: FastAPI, method: str, path: str, body: Any = None) -> int:
    """One request straight through the ASGI interface; the response status."""
    sent: list[dict[str, Any]] = []
    payload = json.dumps(body).encode() if body is not None else b""

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": payload, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    try:
        await app(scope(method, path), receive, send)
    except ValueError:
        pass  # re-raised by Starlette after its 500 answer, as a server would log it
    return next(msg["status"] for msg in sent if msg["type"] == "http.response.start")


def test_router_counts_statuses_and_rejections(router: FastAPI, registry: dict[str, FakeMetric]) -> None:
    async def run() -> None:
        assert await call(router, "POST", "/v1/completions", {"max_tokens": 1}) == 200
        assert await call(router, "POST", "/throughput/v1/completions", {"max_tokens": "x"}) == 422
        assert await call(router, "POST", "/nowhere/v1/completions", {"max_tokens": 1}) == 200
        assert await call(router, "POST", "/overloaded/v1/completions", {"max_tokens": 1}) == 500
        assert await call(router, "GET", "/health") == 200  # outside the tiers' API: not counted

    asyncio.run(run())
    requests = {(t["tier"], t["status_code"]): v for _, v, t in registry[m.HTTP_REQUESTS.name].calls}
    assert requests == {("latency", "200"): 1, ("throughput", "422"): 1, ("unknown", "200"): 1,
                        ("overloaded", "500"): 1}
    assert [(t["tier"], t["reason"]) for _, _, t in registry[m.REJECTIONS.name].calls] == [("throughput", "validation")]
    assert not registry[m.DISCONNECTS.name].calls


def test_router_counts_a_client_leaving_mid_stream(router: FastAPI, registry: dict[str, FakeMetric]) -> None:
    async def run() -> None:
        chunks = 0
        left = asyncio.Event()

        async def receive() -> dict[str, Any]:
            await left.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal chunks
            if message["type"] == "http.response.body":
                chunks += 1
                if chunks == 3:
                    left.set()

        await asyncio.wait_for(router(scope("GET", "/throughput/v1/stream"), receive, send), 10)

        # Serve cancels the call instead when the client of a plain request leaves.
        task = asyncio.create_task(router(scope("GET", "/latency/v1/stream"), asyncio.Event().wait, send))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(TaskCancelledError):
            await router({**scope("GET", "/fixed-latency/v1/stream"), "query_string": b"cut=true"},
                         asyncio.Event().wait, send)

        # Serve's receive may raise instead, when the proxy's side of the request was cancelled: to the
        # app that is the client's disconnect, not an error (no traceback, the stream ends quietly).
        async def cancelled_receive() -> dict[str, Any]:
            await left.wait()
            raise TaskCancelledError()

        chunks = 0
        left.clear()
        await asyncio.wait_for(router(scope("GET", "/throughput/v1/stream"), cancelled_receive, send), 10)

        # Serve cancels the request's calls with it: when the stream's replica call ends first, Starlette
        # ends the response quietly (no disconnect message, nothing raised), its body never finished.
        await asyncio.wait_for(router({**scope("GET", "/latency/v1/stream"), "query_string": b"inner=true"},
                                      asyncio.Event().wait, send), 10)

    asyncio.run(run())
    assert registry[m.DISCONNECTS.name].by("tier") == {"throughput": 2, "latency": 2, "fixed-latency": 1}
    assert registry[m.HTTP_REQUESTS.name].by("status_code") == {"200": 5}  # all had started their response
