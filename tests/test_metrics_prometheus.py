"""Metrics end to end: a real Prometheus scrapes a real Ray Serve app of configs/local.yaml while
traffic goes through every tier, then every query of every dashboard (template variables set to
real values) and every recording rule is sent to Prometheus's HTTP API: all must parse, and all
must return data.

Prometheus (Debian's package, installed by .ci/run) runs as a plain process on 127.0.0.1 with a
temporary data directory, scraping Ray's metrics export port every second; Ray reports metrics
every second here instead of every ten.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from dashboards import build, promql
from engine.checkpoint import default_model_dir
from engine.lora_adapter import write_random_adapter

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None,
                                reason="prometheus not installed (.ci/run installs Debian's package)")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "local.yaml"
RULES = ROOT / build.rules_file(CONFIG)  # the rules shipped for that config
APP = "mixtral"
TIERS = ("latency", "throughput", "fixed-latency")
MODEL = "mixtral-tiny"
ADAPTER = "tuned"  # a LoRA adapter the latency tier serves
RATE_INTERVAL = "1m"  # what Grafana's $__rate_interval would be for a 1 s scrape interval and a short range
DATA_TIMEOUT_S = 60  # Ray's export delay plus two scrapes for every rate()
# Over two blocks of 16 tokens, sent twice per tier: the second time it hits the prefix cache.
LONG_PROMPT = " ".join(f"word{i}" for i in range(60))


def free_port() -> int:
    """An OS-assigned port: always outside Ray's worker port range (10002-19999)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stack:
    base: str  # the app's HTTP address
    prometheus: str

    def query(self, expr: str) -> dict[str, Any]:
        return requests.get(f"{self.prometheus}/api/v1/query", params={"query": expr}, timeout=30).json()


def start_prometheus(tmp: Path, metrics_port: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = (tmp / "prometheus.log").open("wb")
    process = subprocess.Popen(
        ["prometheus", f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if requests.get(f"{url}/-/ready", timeout=1).status_code == 200:
                return process, url
        except requests.ConnectionError:
            pass
        assert process.poll() is None, (tmp / "prometheus.log").read_text()[-2000:]
        assert time.monotonic() < deadline, "Prometheus did not become ready in 30 s"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from deployments.app import build_app

    metrics_port, http_port = free_port(), free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, _metrics_export_port=metrics_port,
             logging_level="ERROR", _system_config={"metrics_report_interval_ms": 1000})
    prometheus = None
    try:
        prometheus, prometheus_url = start_prometheus(tmp_path_factory.mktemp("prometheus"), metrics_port)
        t0 = time.monotonic()
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        args = yaml.safe_load(CONFIG.read_text())["applications"][0]["args"]
        # The latency tier serves a LoRA adapter too, so the dashboard's adapter panels have data.
        adapter = write_random_adapter(default_model_dir(), tmp_path_factory.mktemp("adapter") / ADAPTER, rank=4)
        args["tiers"]["latency"]["engine"]["lora"] = {"max_loras": 1, "max_lora_rank": 4}
        args["tiers"]["latency"]["lora"] = {"adapters": {ADAPTER: str(adapter)}}
        serve.run(build_app(args), name=APP, route_prefix="/")
        print(f"\napp running {time.monotonic() - t0:.1f}s after serve.start")
        yield Stack(f"http://127.0.0.1:{http_port}", prometheus_url)
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(timeout=30)
        serve.shutdown()
        ray.shutdown()


# ---- traffic ---------------------------------------------------------------------------------------
def complete(stack: Stack, tier: str, prompt: str = "Hello there", stream: bool = False, chat: bool = False,
             max_tokens: int = 8, **extra: Any) -> requests.Response:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": max_tokens, "stream": stream, **extra}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    path = "chat/completions" if chat else "completions"
    response = requests.post(f"{stack.base}/{tier}/v1/{path}", json=body, timeout=120, stream=stream)
    if stream:
        response.content  # read the whole stream  # noqa: B018
    return response


def drive_traffic(stack: Stack) -> None:
    assert complete(stack, "latency", model=ADAPTER).status_code == 200
    for tier in TIERS:
        for stream in (False, True):
            for chat in (False, True):
                assert complete(stack, tier, stream=stream, chat=chat).status_code == 200
        for _ in range(2):
            assert complete(stack, tier, LONG_PROMPT).status_code == 200
        assert complete(stack, tier, temperature=9).status_code == 400  # rejected: validation
    # A client leaving in the middle of a long stream: it leaves at the first token, of a stream long enough
    # (seconds, near the context length) that a loaded host cannot finish it before the client is gone.
    body = {"model": MODEL, "prompt": "Tell a long story", "max_tokens": 2000, "stream": True, "ignore_eos": True}
    with requests.post(f"{stack.base}/throughput/v1/completions", json=body, stream=True, timeout=60) as response:
        assert next(line for line in response.iter_lines() if line).startswith(b"data: ")
    # the `with` closed the connection mid-stream


def background_load(stack: Stack, stop: threading.Event) -> None:
    """Keeps every tier busy while Prometheus is queried, so every rate() is above zero."""
    i = 0
    while not stop.is_set():
        tier = TIERS[i % len(TIERS)]
        complete(stack, tier, stream=i % 2 == 0, max_tokens=16, **({"model": ADAPTER} if i % 6 == 0 else {}))
        i += 1


# ---- the checks ------------------------------------------------------------------------------------
def dashboard_queries() -> list[tuple[str, str]]:
    queries = []
    for path in sorted(build.JSON_DIR.glob("*.json")):
        dashboard = json.loads(path.read_text())
        queries += [(f"{dashboard['title']} / {panel['title']} / {target['refId']}", target["expr"])
                    for panel in dashboard["panels"] for target in panel.get("targets", [])]
    return queries


def variable_queries() -> list[tuple[str, str, str]]:
    """(name, series selector, label) of each `label_values` variable."""
    found = []
    for path in sorted(build.JSON_DIR.glob("*.json")):
        for var in json.loads(path.read_text())["templating"]["list"]:
            if var["type"] == "query":
                match = re.fullmatch(r"label_values\((.*), *(\w+)\)", var["query"]["query"])
                assert match, var
                found.append((var["name"], match.group(1), match.group(2)))
    return found


def label_values(stack: Stack, selector: str, label: str) -> list[str]:
    response = requests.get(f"{stack.prometheus}/api/v1/series", params={"match[]": selector}, timeout=30).json()
    assert response["status"] == "success", response
    return sorted({series[label] for series in response["data"] if label in series})


def substitute(expr: str, values: dict[str, list[str]]) -> str:
    """What Grafana sends: a multi-value variable as a regex alternation, regex characters
    escaped with a backslash doubled for the PromQL string."""
    expr = expr.replace("$__rate_interval", RATE_INTERVAL)
    for name in sorted(values, key=len, reverse=True):
        escaped = [re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\\\1", v) for v in values[name]]
        expr = expr.replace(f"${name}", "(" + "|".join(escaped) + ")")
    assert "$" not in expr, expr
    return expr


def has_data(result: dict[str, Any]) -> bool:
    """A non-empty result with at least one finite value."""
    series = result["data"]["result"]
    return any(math.isfinite(float(s["value"][1])) for s in series)


@pytest.fixture(scope="module")
def traffic(stack: Stack) -> Iterator[float]:
    """The traffic once, then a light load on every tier until the module ends, so every rate()
    stays above zero while Prometheus is queried. Yields when the traffic was sent."""
    drive_traffic(stack)
    sent = time.monotonic()
    stop = threading.Event()
    loader = threading.Thread(target=background_load, args=(stack, stop), daemon=True)
    loader.start()
    yield sent
    stop.set()
    loader.join(timeout=120)


def test_every_dashboard_query_returns_data(stack: Stack, traffic: float) -> None:
    deadline = traffic + DATA_TIMEOUT_S
    while True:
        values: dict[str, list[str]] = {}
        for name, sel, label in variable_queries():  # in order: `replica` filters by `$tier`
            values[name] = label_values(stack, substitute(sel, values), label)
        queries = [(where, substitute(expr, values)) for where, expr in dashboard_queries()]
        results = {where: stack.query(expr) for where, expr in queries}
        empty = [where for where, r in results.items() if r["status"] != "success" or not has_data(r)]
        if (not empty and all(values.values())) or time.monotonic() > deadline:
            break
        time.sleep(2)

    failed = {where: r.get("error") for where, r in results.items() if r["status"] != "success"}
    assert not failed, f"queries Prometheus rejected: {failed}"
    print(f"\n{len(queries)} dashboard queries: all parsed, {len(queries) - len(empty)} returned data "
          f"{time.monotonic() - traffic:.0f}s after the traffic; variables: {values}")
    assert all(values.values()), f"a template variable has no values: {values}"
    assert set(values["tier"]) == set(TIERS)
    assert not empty, "queries without data:\n" + "\n".join(f"  {where}: {dict(queries)[where]}" for where in empty)


def by_tier(stack: Stack, expr: str) -> dict[str, float]:
    return {s["metric"]["tier"]: float(s["value"][1]) for s in stack.query(f"sum by (tier) ({expr})")["data"]["result"]}


def test_recorded_values_match_the_traffic(stack: Stack, traffic: float) -> None:
    """The rejected request, the client that left and the prefix-cache hits are counted where
    they happened; each layer's expert shares add up to 1; the autoscaler reports every tier."""
    expected = {
        'ray_mixtral_request_rejections_total{reason="validation"}': {t: 1.0 for t in TIERS},
        'ray_mixtral_http_requests_total{status_code="400"}': {t: 1.0 for t in TIERS},
        "ray_mixtral_client_disconnects_total": {"throughput": 1.0},
        "ray_mixtral_autoscaler_current_replicas": {t: 1.0 for t in TIERS},
    }
    deadline = traffic + DATA_TIMEOUT_S
    while True:
        seen = {expr: by_tier(stack, expr) for expr in expected}
        aborted = by_tier(stack, 'ray_mixtral_request_success_total{finished_reason="abort"}')
        hits = by_tier(stack, "ray_mixtral_prefix_cache_hits_total")
        if (seen == expected and aborted.get("throughput", 0) >= 1 and set(hits) == set(TIERS)) \
                or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert seen == expected
    assert aborted.get("throughput", 0) >= 1, aborted  # the replica aborted the stream the client left
    assert set(hits) == set(TIERS) and all(v > 0 for v in hits.values()), hits

    share = stack.query(promql.expert_share(promql.selector(tier="~.+"), RATE_INTERVAL))["data"]["result"]
    assert len(share) == 2 * 8  # the tiny preset: 2 layers of 8 experts
    for layer in ("0", "1"):
        total = sum(float(s["value"][1]) for s in share if s["metric"]["layer"] == layer)
        assert total == pytest.approx(1.0), (layer, share)


def test_rules_evaluate_with_data(stack: Stack, traffic: float) -> None:
    """Every rule is healthy and every recorded series has data."""
    deadline = traffic + DATA_TIMEOUT_S
    while True:
        groups = requests.get(f"{stack.prometheus}/api/v1/rules", timeout=30).json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        recorded = sorted({rule["name"] for rule in rules if rule["type"] == "recording"})
        empty = [name for name in recorded if not has_data(stack.query(name))]
        if not empty or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert len(rules) == sum(len(g["rules"]) for g in yaml.safe_load(RULES.read_text())["groups"])
    unhealthy = {rule["name"]: rule.get("lastError") for rule in rules if rule["health"] != "ok"}
    assert not unhealthy, unhealthy
    print(f"\n{len(rules)} rules healthy; {len(recorded) - len(empty)} of {len(recorded)} recorded series have data")
    assert not empty, empty
