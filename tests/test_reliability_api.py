"""Errors, API keys, backpressure, time limits and draining on a real Serve app (one per module).

Tiers as configured here: fixed-latency admits 1 running + 1 queued request (the overload test),
throughput has a 3 s time limit per request (the 408 tests) and is drained by the last test.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

ray = pytest.importorskip("ray")

from tests.reliability_support import KEY, MODEL, Served, serve_app, tier_args  # noqa: E402

WRONG_KEY = "sk-wrong-2e9d41c7a05b8f63"
MAX_BODY = 64 * 1024
TIMEOUT_S = 3.0


def customise(config: dict[str, Any]) -> None:
    args = config["applications"][0]["args"]
    args["router"]["max_body_bytes"] = MAX_BODY
    tier_args(config, "fixed-latency")["admission"] = {"max_ongoing": 1, "max_queued": 1}
    tier_args(config, "throughput")["admission"] = {"request_timeout_s": TIMEOUT_S}


@pytest.fixture(scope="module")
def app() -> Iterator[Served]:
    with serve_app(customise) as served:
        yield served


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "Hello", "max_tokens": 4, **fields}


def assert_envelope(response: requests.Response, status: int, type_: str, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert len(response.content) < 4096
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == type_, error
    assert error["param"] == param, error
    assert "/work/" not in error["message"] and "Traceback" not in error["message"]
    return error


# ---- 1. errors ------------------------------------------------------------------------------
CASES = [
    # (name, path, body (dict) or raw bytes, headers override, status, type, param)
    ("bad value", "/latency/v1/completions", completion(temperature=5), None, 400, "invalid_request_error",
     "temperature"),
    ("wrong type", "/latency/v1/completions", completion(max_tokens="many"), None, 400, "invalid_request_error",
     "max_tokens"),
    ("missing field", "/v1/chat/completions", {"model": MODEL}, None, 400, "invalid_request_error", "messages"),
    ("malformed json", "/v1/completions", b'{"prompt": "Hi", ', None, 400, "invalid_request_error", "body"),
    ("not an object", "/v1/completions", b"[1, 2]", None, 400, "invalid_request_error", "body"),
    ("unsupported", "/v1/completions", completion(echo=True), None, 400, "invalid_request_error", "echo"),
    ("too long", "/latency/v1/completions", completion(prompt=[1] * 3000), None, 400, "invalid_request_error",
     "prompt"),
    ("context overflow", "/latency/v1/completions", completion(prompt=[1] * 100, max_tokens=2000), None, 400,
     "invalid_request_error", "max_tokens"),
    ("unknown model", "/v1/completions", completion(model="gpt-5"), None, 404, "not_found_error", "model"),
    ("unknown tier", "/nope/v1/completions", completion(), None, 404, "not_found_error", None),
    ("unknown route", "/latency/v2/completions", completion(), None, 404, "not_found_error", None),
    ("no key", "/v1/completions", completion(), {}, 401, "authentication_error", None),
    ("wrong key", "/v1/completions", completion(), {"Authorization": f"Bearer {WRONG_KEY}"}, 401,
     "authentication_error", None),
    ("body too large", "/v1/completions", completion(prompt="x" * MAX_BODY), None, 413, "invalid_request_error",
     None),
]


@pytest.mark.parametrize("name, path, body, headers, status, type_, param", CASES, ids=[c[0] for c in CASES])
def test_error_table(app: Served, name: str, path: str, body: Any, headers: dict[str, str] | None, status: int,
                     type_: str, param: str | None) -> None:
    headers = app.auth if headers is None else headers
    kwargs = {"data": body, "headers": {**headers, "content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body, "headers": headers}
    response = requests.post(app.url(path), timeout=60, **kwargs)
    error = assert_envelope(response, status, type_, param)
    assert KEY not in response.text and WRONG_KEY not in response.text
    if name == "too long":
        assert "2048" in error["message"] and "3000" in error["message"]  # allowed and sent


def test_error_after_streaming_started_is_in_band(app: Served) -> None:
    body = completion(max_tokens=1900, ignore_eos=True, stream=True)
    with app.post("/throughput/v1/completions", body, stream=True) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["code"] == "request_timeout" and error["type"] == "timeout_error"
    assert len(events) > 3  # tokens were streamed before the limit hit


def test_time_limit_is_408(app: Served) -> None:
    t0 = time.monotonic()
    response = app.post("/throughput/v1/completions", completion(max_tokens=1900, ignore_eos=True))
    assert_envelope(response, 408, "timeout_error")
    assert time.monotonic() - t0 < TIMEOUT_S + 2


# ---- 2. API keys ----------------------------------------------------------------------------
def routes() -> list[tuple[str, str]]:
    """(method, concrete path) for every route of the router's FastAPI app, included routers too
    (Serve's class-based view moves the deployment's routes into one)."""
    from deployments.router import app as fastapi_app

    found = []

    def walk(routes: list[Any], prefix: str) -> None:
        for route in routes:
            if hasattr(route, "original_router"):
                walk(route.original_router.routes, prefix + route.include_context.prefix)
                continue
            for method in sorted(route.methods or {"GET"}):
                if method != "HEAD":
                    found.append((method, (prefix + route.path).replace("{tier}", "throughput")))

    walk(fastapi_app.routes, "")
    return found


def test_every_route_but_health_needs_the_key(app: Served) -> None:
    found = routes()
    assert ("GET", "/health") in found and ("POST", "/throughput/v1/chat/completions") in found
    bodies = {"/chat/completions": {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]},
              "/completions": completion(), "/detokenize": {"tokens": [1, 415]},
              "/tokenize": {"prompt": "Hi"}, "/load_lora_adapter": {"lora_name": "x", "lora_path": "/x"},
              "/unload_lora_adapter": {"lora_name": "x"}}  # most specific suffix first
    # With the key, the adapter routes answer this config's refusal: its tiers load no adapters at runtime.
    refused = ("/load_lora_adapter", "/unload_lora_adapter")
    for method, path in found:
        body = next((b for suffix, b in bodies.items() if path.endswith(suffix)), None)
        outcomes = {}
        for label, headers in (("none", {}), ("wrong", {"Authorization": f"Bearer {WRONG_KEY}"}),
                               ("right", app.auth)):
            outcomes[label] = requests.request(method, app.url(path), json=body, headers=headers, timeout=60)
        if path == "/health":
            assert all(r.status_code == 200 for r in outcomes.values()), path
            continue
        for label in ("none", "wrong"):
            assert_envelope(outcomes[label], 401, "authentication_error")
        if path.endswith(refused):
            assert outcomes["right"].json()["error"]["code"] == "runtime_loading_disabled", (path, outcomes["right"].text)
            continue
        assert outcomes["right"].status_code == 200, (method, path, outcomes["right"].text)


def test_keys_never_reach_the_logs(app: Served) -> None:
    requests.get(app.url("/v1/models"), headers={"Authorization": f"Bearer {WRONG_KEY}"}, timeout=30)
    requests.post(app.url("/v1/completions"), json=completion(model="nope"), headers=app.auth, timeout=30)
    time.sleep(2)  # log files are flushed asynchronously
    logs = Path("/tmp/ray/session_latest/logs")
    files = [p for p in logs.rglob("*") if p.is_file()]
    assert files
    leaked = [str(p) for p in files if KEY.encode() in p.read_bytes() or WRONG_KEY.encode() in p.read_bytes()]
    assert not leaked


# ---- 3. backpressure ------------------------------------------------------------------------
def test_overload_gives_429_with_retry_after(app: Served) -> None:
    body = completion(max_tokens=150, ignore_eos=True)
    barrier = threading.Barrier(10)

    def one(_: int) -> requests.Response:
        barrier.wait()
        return app.post("/fixed-latency/v1/completions", body)

    with ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(one, range(10)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 2 + [429] * 8, statuses
    for response in responses:
        if response.status_code == 429:
            assert_envelope(response, 429, "rate_limit_error")
            assert int(response.headers["Retry-After"]) >= 1
    for _ in range(4):  # serial requests all succeed afterwards
        assert app.post("/fixed-latency/v1/completions", completion()).status_code == 200


# ---- 5. draining (last: the drained replica is then replaced) --------------------------------
def test_drain_finishes_in_flight_and_refuses_new(app: Served) -> None:
    from ray import serve

    body = completion(max_tokens=60, ignore_eos=True, stream=True)
    in_flight: list[requests.Response] = []
    events: list[list[str]] = []

    def stream() -> None:
        with app.post("/throughput/v1/completions", body, stream=True) as response:
            in_flight.append(response)
            events.append([line for line in response.iter_lines(decode_unicode=True) if line])

    threads = [threading.Thread(target=stream) for _ in range(3)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while len(in_flight) < 3:  # all three have their headers: they are running
        assert time.monotonic() < deadline
        time.sleep(0.05)
    drain = serve.get_deployment_handle("throughput", app_name="mixtral").drain.remote()
    time.sleep(0.2)
    refused = app.post("/throughput/v1/completions", completion())
    assert_envelope(refused, 503, "service_unavailable_error")
    assert refused.json()["error"]["code"] == "draining"
    for thread in threads:
        thread.join(60)
    result = drain.result(timeout_s=60)
    assert result["aborted"] == 0
    for stream_events in events:
        assert stream_events[-1] == "data: [DONE]"
        chunks = [json.loads(e.removeprefix("data: ")) for e in stream_events[:-1]]
        assert all("error" not in c for c in chunks)
        assert re.fullmatch(r"length", chunks[-1]["choices"][0]["finish_reason"] or "")
