"""The router's guards on a bare FastAPI app (no Ray): API keys, body size, tier admission."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import SecretStr, ValidationError

from deployments.auth import ApiKeyGuard, ApiKeyMiddleware, AuthConfig
from deployments.backpressure import AdmissionConfig, Overloaded, TierGate
from deployments.body_limit import BodyLimitMiddleware
from deployments.errors import install_error_handlers

KEY = "sk-test-0123456789abcdef"
LATENCY_ONLY = "sk-latency-0123456789abcdef"


def make_app(auth: AuthConfig, max_body_bytes: int = 1024) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    guard = ApiKeyGuard(auth.entries(), default_tier="latency")
    app.add_middleware(ApiKeyMiddleware, guard=lambda: guard)
    # Added last = outermost: a huge body is refused before anything else.
    app.add_middleware(BodyLimitMiddleware, limit=lambda: max_body_bytes)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    @app.get("/{tier}/v1/models")
    async def models(tier: str | None = None) -> dict[str, str | None]:
        return {"tier": tier}

    @app.post("/{tier}/v1/completions")
    async def completions(tier: str, body: dict[str, int]) -> dict[str, int]:
        return body

    return app


@pytest.fixture
def client() -> Iterator[TestClient]:
    auth = AuthConfig(api_keys=[SecretStr(KEY), {"key": LATENCY_ONLY, "tiers": ["latency"]}])
    with TestClient(make_app(auth)) as c:
        yield c


@contextmanager
def serve_log(caplog: pytest.LogCaptureFixture, level: int) -> Iterator[None]:
    """Captures the "ray.serve" logger, which stops propagating once Ray Serve is imported."""
    logger = logging.getLogger("ray.serve")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(level, logger="ray.serve"):
            yield
    finally:
        logger.removeHandler(caplog.handler)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_envelope(response, status: int, type_: str, code: str | None = None) -> None:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == type_
    if code is not None:
        assert error["code"] == code


@pytest.mark.parametrize("headers, code", [
    ({}, "missing_api_key"),
    ({"Authorization": "Basic abc"}, "missing_api_key"),
    ({"Authorization": "Bearer "}, "missing_api_key"),
    (bearer("sk-wrong-0123456789abcdef"), "invalid_api_key"),
    (bearer(KEY[:-1]), "invalid_api_key"),
    ({"Authorization": "Bearer ".encode() + "é".encode() * 20}, "invalid_api_key"),  # non-ASCII bytes
])
def test_bad_keys_get_401(client: TestClient, headers: dict[str, str | bytes], code: str) -> None:
    for path in ("/v1/models", "/latency/v1/models", "/nope", "/openapi.json"):
        response = client.get(path, headers=headers)
        assert_envelope(response, 401, "authentication_error", code)
        assert response.headers["www-authenticate"] == "Bearer"
        assert KEY not in response.text


def test_right_key_and_open_health(client: TestClient) -> None:
    assert client.get("/health").status_code == 200
    assert client.get("/v1/models", headers=bearer(KEY)).status_code == 200
    assert client.get("/throughput/v1/models", headers=bearer(KEY)).json() == {"tier": "throughput"}
    assert client.get("/openapi.json", headers=bearer(KEY)).status_code == 200


def test_tier_allow_list(client: TestClient) -> None:
    assert client.get("/latency/v1/models", headers=bearer(LATENCY_ONLY)).status_code == 200
    assert client.get("/v1/models", headers=bearer(LATENCY_ONLY)).status_code == 200  # the default tier
    assert_envelope(client.get("/throughput/v1/models", headers=bearer(LATENCY_ONLY)), 403, "permission_error",
                    "tier_not_allowed")


def test_keys_from_env_and_file(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TEST_MIXTRAL_KEYS", "sk-env-one-0123456789, sk-env-two-0123456789")
    key_file = tmp_path / "keys"
    key_file.write_text("# operators\nsk-file-0123456789abc\n\n")
    auth = AuthConfig(api_keys_env="TEST_MIXTRAL_KEYS", api_key_file=key_file)
    with TestClient(make_app(auth)) as c:
        for key in ("sk-env-one-0123456789", "sk-env-two-0123456789", "sk-file-0123456789abc"):
            assert c.get("/v1/models", headers=bearer(key)).status_code == 200
        assert c.get("/v1/models", headers=bearer("# operators")).status_code == 401
    with pytest.raises(ValueError, match="NOT_SET_ANYWHERE is not set"):
        AuthConfig(api_keys_env="NOT_SET_ANYWHERE").entries()
    with pytest.raises(ValueError, match="cannot read the key file") as err:
        AuthConfig(api_key_file=tmp_path / "missing").entries()
    assert str(tmp_path) not in str(err.value)  # no server paths in messages


def test_keys_stay_secret(caplog: pytest.LogCaptureFixture) -> None:
    config = AuthConfig(api_keys=[SecretStr(KEY)])
    assert KEY not in repr(config) and KEY not in str(config.model_dump())
    with pytest.raises(ValidationError) as err:
        AuthConfig(api_keys=["short-key"])
    assert "short-key" not in str(err.value)
    with serve_log(caplog, logging.INFO):
        ApiKeyGuard(config.entries(), "latency")
    assert KEY not in caplog.text


def test_no_keys_is_open_and_loud(caplog: pytest.LogCaptureFixture) -> None:
    with serve_log(caplog, logging.WARNING):
        app = make_app(AuthConfig())
    assert "NO API KEYS CONFIGURED" in caplog.text
    with TestClient(app) as c:
        assert c.get("/v1/models").status_code == 200


def test_body_limit(client: TestClient) -> None:
    ok = client.post("/latency/v1/completions", headers=bearer(KEY), json={"a": 1})
    assert ok.status_code == 200
    big = {"a": 1, **{f"k{i}": i for i in range(200)}}
    assert_envelope(client.post("/latency/v1/completions", headers=bearer(KEY), json=big), 413,
                    "invalid_request_error", "request_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams in
        yield b'{"a": 1, "pad": "'
        for _ in range(20):
            yield b"x" * 100
        yield b'"}'

    assert_envelope(client.post("/latency/v1/completions", headers=bearer(KEY), content=chunks()), 413,
                    "invalid_request_error", "request_too_large")
    # Size is checked before the key: refusing a huge body tells an anonymous client nothing.
    assert client.post("/latency/v1/completions", json=big).status_code == 413


def test_gate_admits_up_to_its_limits() -> None:
    gate = TierGate("latency", AdmissionConfig(max_ongoing=1, max_queued=1, initial_request_seconds=2.0))
    first, second = gate.admit(), gate.admit()
    with pytest.raises(Overloaded) as err:
        gate.admit()
    response = err.value.response()
    assert response.status_code == 429 and int(response.headers["Retry-After"]) >= 1
    assert err.value.body()["error"]["type"] == "rate_limit_error"
    first.release()
    first.release()  # idempotent
    assert gate.in_flight == 1
    third = gate.admit()
    second.release()
    third.release()
    assert gate.in_flight == 0


def test_retry_after_grows_with_the_queue() -> None:
    gate = TierGate("t", AdmissionConfig(max_ongoing=2, max_queued=10, initial_request_seconds=3.0))
    slots = [gate.admit() for _ in range(2)]
    short = gate.retry_after()
    slots += [gate.admit() for _ in range(10)]
    assert gate.retry_after() > short >= 1
    for slot in slots:
        slot.release()


def test_unexpected_errors_are_scrubbed() -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("/srv/mixtral/engine/secret.py: key sk-abc leaked")

    with TestClient(app, raise_server_exceptions=False) as c:
        response = c.get("/boom")
    assert_envelope(response, 500, "internal_server_error")
    assert "/srv" not in response.text and "sk-abc" not in response.text and "RuntimeError" not in response.text


def test_error_messages_are_bounded(client: TestClient) -> None:
    response = client.get("/" + "x" * 50_000 + "/v1/models", headers=bearer(LATENCY_ONLY))
    assert response.status_code == 403 and len(response.content) < 2048


def test_logprobs_are_json_finite() -> None:
    """log(0) = -inf reached JSON once (a 500 found by the Schemathesis test): floored like vLLM."""
    from deployments.replica import _finite

    assert _finite(float("-inf")) == _finite(float("nan")) == -9999.0
    assert _finite(-1.5) == -1.5
