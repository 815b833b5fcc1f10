"""Schemathesis against the app's own `/openapi.json`: no 5xx, every error in OpenAI's envelope.

The document is fetched from the running app (with the API key, as it is guarded) and narrowed
only where fuzzing would be slow or pointless: `{tier}` takes the configured tiers plus one
unknown name, and token counts are capped so each generated request costs milliseconds.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import requests

ray = pytest.importorskip("ray")
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

from tests.reliability_support import TIERS, Served, serve_app  # noqa: E402

# Per operation; GETs with few distinct inputs stop early. NOTE: drawing the cases, not serving them,
# is most of the test's time (~95% of its process in Hypothesis, ~40 ms a case on two cores).
EXAMPLES = {"post": 200, "get": 50}
CHEAP = {"max_tokens": 8, "max_completion_tokens": 8, "n": 2, "logprobs": 2, "top_logprobs": 2, "min_tokens": 8}


@pytest.fixture(scope="module")
def app() -> Iterator[Served]:
    with serve_app(lambda config: None) as served:
        yield served


def narrow(node: Any) -> None:
    """Caps the costly integer fields wherever they appear in the document."""
    if isinstance(node, dict):
        for name, cap in CHEAP.items():
            prop = node.get("properties", {}).get(name)
            if prop is not None:
                for option in prop.get("anyOf", [prop]):
                    if option.get("type") == "integer":
                        option["maximum"] = min(option.get("maximum", cap), cap)
        for value in node.values():
            narrow(value)
    elif isinstance(node, list):
        for value in node:
            narrow(value)


def check(response: requests.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert len(response.content) < 8192
    elif response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line for line in response.text.splitlines() if line]
        assert events[-1] == "data: [DONE]"
        for event in events[:-1]:
            payload = json.loads(event.removeprefix("data: "))
            assert "error" not in payload or set(payload["error"]) == {"message", "type", "param", "code"}


def test_fuzz_every_route(app: Served) -> None:
    doc = requests.get(app.url("/openapi.json"), headers=app.auth, timeout=30).json()
    narrow(doc)
    for path in doc["paths"].values():
        for operation in path.values():
            for param in operation.get("parameters", []):
                if param["name"] == "tier":
                    param["schema"] = {"type": "string", "enum": [*TIERS, "no-such-tier"]}
    schema = schemathesis.openapi.from_dict(doc)
    session = requests.Session()
    statuses: Counter[int] = Counter()
    t0 = time.monotonic()
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=EXAMPLES[operation.method], deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def run(case: Any) -> None:
            # NOTE: sent with requests directly: `case.call` breaks on this box's urllib3-future pools.
            response = session.request(**case.as_transport_kwargs(base_url=app.base, headers=app.auth), timeout=60)
            statuses[response.status_code] += 1
            check(response)

        run()
    took = time.monotonic() - t0
    print(f"\nfuzz: {sum(statuses.values())} requests in {took:.1f}s, statuses {dict(sorted(statuses.items()))}")
    assert sum(statuses.values()) >= 1000
    assert not [s for s in statuses if s >= 500]
