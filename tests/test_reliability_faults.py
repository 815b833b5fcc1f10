"""Cancellation soak and a replica killed under load, on a real Serve app (one for the module)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import requests

ray = pytest.importorskip("ray")
aiohttp = pytest.importorskip("aiohttp")

from tests.reliability_support import (  # noqa: E402
    APP, KEY, MODEL, TIERS, Served, engine_stats, serve_app, tier_args,
)

SOAK_S = 60.0  # launch window; stragglers finish within their own max_tokens
CONCURRENCY = 24


def customise(config: dict[str, Any]) -> None:
    for tier in TIERS:  # replicas are checked often, so a dead one is noticed quickly
        tier_args(config, tier)["deployment"].update(health_check_period_s=1, health_check_timeout_s=10)


@pytest.fixture(scope="module")
def app() -> Iterator[Served]:
    with serve_app(customise) as served:
        yield served


def body(rng: random.Random, stream: bool) -> tuple[str, dict[str, Any], int]:
    max_tokens = rng.randint(1, 24)
    common = {"model": MODEL, "max_tokens": max_tokens, "ignore_eos": True, "stream": stream,
              "temperature": rng.choice([0.0, 0.8])}
    if rng.random() < 0.5:
        return "completions", {**common, "prompt": "word " * rng.randint(1, 60)}, max_tokens
    return "chat/completions", {**common, "messages": [{"role": "user", "content": "hi " * rng.randint(1, 40)}]}, \
        max_tokens


def check_whole(kind: str, data: dict[str, Any], max_tokens: int) -> None:
    assert data["usage"]["completion_tokens"] == max_tokens, data
    choice = data["choices"][0]
    assert choice["finish_reason"] == "length"
    assert isinstance(choice["text"] if kind == "completions" else choice["message"]["content"], str)


def check_stream(kind: str, lines: list[str], max_tokens: int) -> None:
    assert lines[-1] == "data: [DONE]", lines[-3:]
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all("error" not in c for c in chunks), chunks
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def soak(base: str, seed: int) -> Counter[str]:
    rng = random.Random(seed)
    counts: Counter[str] = Counter()
    headers = {"Authorization": f"Bearer {KEY}"}
    deadline = time.monotonic() + SOAK_S

    async def one(session: aiohttp.ClientSession) -> None:
        tier, stream = rng.choice(TIERS), rng.random() < 0.5
        kind, payload, max_tokens = body(rng, stream)
        disconnect = rng.random() < 1 / 3
        url = f"{base}/{tier}/v1/{kind}"

        async def call() -> None:
            async with session.post(url, json=payload, headers=headers) as response:
                assert response.status == 200, await response.text()
                if stream:
                    lines = [line.decode().strip() async for line in response.content]
                    check_stream(kind, [line for line in lines if line], max_tokens)
                else:
                    check_whole(kind, await response.json(), max_tokens)

        if disconnect:
            task = asyncio.create_task(call())
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            task.cancel()  # closes the connection mid-request (or after it finished)
            await asyncio.gather(task, return_exceptions=True)
            counts["disconnected"] += 1
        else:
            await asyncio.wait_for(call(), 60)
            counts["completed"] += 1

    async def worker(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            await one(session)

    # force_close: a cancelled request's connection is never reused half-read.
    connector = aiohttp.TCPConnector(limit=CONCURRENCY * 2, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=90)) as session:
        await asyncio.gather(*(worker(session) for _ in range(CONCURRENCY)))
    return counts


def test_soak_with_disconnects_leaves_engines_empty(app: Served) -> None:
    t0 = time.monotonic()
    counts = asyncio.run(soak(app.base, seed=7))
    took = time.monotonic() - t0
    print(f"\nsoak: {dict(counts)} in {took:.1f}s")
    assert counts["completed"] + counts["disconnected"] >= 300
    deadline = time.monotonic() + 10
    for tier in TIERS:
        while True:
            stats = engine_stats(tier)
            idle = stats["num_running"] == 0 and stats["num_waiting"] == 0 and stats["kv_blocks_used"] == 0
            if idle:
                break
            assert time.monotonic() < deadline, (tier, stats)
            time.sleep(0.2)


def alive_replica_pids(tier: str) -> list[int]:
    from ray.util.state import list_actors

    return [int(a.pid) for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
            if a.class_name == f"ServeReplica:{APP}:{tier}"]


def replica_pid(tier: str) -> int:
    pids = alive_replica_pids(tier)
    assert len(pids) == 1, pids
    return pids[0]


def test_killed_replica_is_replaced(app: Served) -> None:
    from ray import serve

    timeout_s = 20.0
    stop = threading.Event()
    results: list[tuple[float, float, int]] = []  # (start, end, status)

    def load() -> None:
        while not stop.is_set():
            start = time.monotonic()
            try:
                status = app.post("/latency/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 8},
                                  timeout=timeout_s).status_code
            except requests.RequestException:
                status = -1
            results.append((start, time.monotonic(), status))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(2)
    old_pid = replica_pid("latency")
    killed_at = time.monotonic()
    os.kill(old_pid, signal.SIGKILL)
    # Recovered: Serve reports a replacement replica (another process) running.
    while True:
        assert time.monotonic() - killed_at < 90, "no replacement replica within 90 s"
        time.sleep(0.1)
        running = serve.status().applications[APP].deployments["latency"].replica_states.get("RUNNING", 0)
        pids = alive_replica_pids("latency")
        if running == 1 and pids and old_pid not in pids:
            recovered_at = time.monotonic()
            break
    time.sleep(3)
    stop.set()
    for thread in threads:
        thread.join(timeout_s + 5)
    recovery = recovered_at - killed_at
    in_flight = Counter(status for start, end, status in results if start <= killed_at < end)
    after = Counter(status for start, _, status in results if start > killed_at)
    print(f"\nkill: recovery {recovery:.1f}s; in flight at the kill {dict(in_flight)}; started after {dict(after)}")
    assert all(end - start < timeout_s + 1 for start, end, _ in results)  # no client waited past its timeout
    assert set(in_flight) | set(after) <= {200, 503}  # failures are 503s (retry), never 500s or hangs
    assert all(status == 200 for start, _, status in results if start >= recovered_at)
