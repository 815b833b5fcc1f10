"""Starting the Serve app (configs/local.yaml, test ports, an API key) for the reliability tests."""

from __future__ import annotations

import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import yaml

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "local.yaml"
APP = "mixtral"
TIERS = ("latency", "throughput", "fixed-latency")
MODEL = "mixtral-tiny"
KEY = "sk-reliability-test-6f1c0a9e2b7d4c35"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    base: str
    config: dict[str, Any]

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {KEY}"}

    def post(self, path: str, body: Any, timeout: float = 120, **kwargs: Any) -> requests.Response:
        return requests.post(self.url(path), json=body, headers=self.auth, timeout=timeout, **kwargs)


def base_config(http_port: int) -> dict[str, Any]:
    """configs/local.yaml with a free port, one API key, no autoscaling surprises."""
    config = yaml.safe_load(CONFIG.read_text())
    config["http_options"]["port"] = http_port
    args = config["applications"][0]["args"]
    # NOTE: a key file, as production should: inline keys would travel in the deployed config,
    # which Ray keeps (and its dashboard shows).
    key_file = Path(tempfile.mkdtemp()) / "api-keys"
    key_file.write_text(f"# test key\n{KEY}\n")
    args["auth"] = {"api_key_file": str(key_file)}
    for tier in args["tiers"].values():
        tier["autoscaling"].update(min_replicas=1, max_replicas=1)
        tier["tuning"].pop("ttft_target_ms", None)
    return config


@contextmanager
def serve_app(customise: Callable[[dict[str, Any]], None]) -> Iterator[Served]:
    """Ray (2 CPUs) + the app deployed the way `serve deploy` does; torn down on exit."""
    import ray
    from ray import serve
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    dashboard, http = free_port(), free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=dashboard, _metrics_export_port=free_port(), logging_level="ERROR")
    try:
        config = base_config(http)
        customise(config)
        ServeSubmissionClient(f"http://127.0.0.1:{dashboard}").deploy_applications(config)
        t0 = time.monotonic()
        while (status := serve.status().applications.get(APP)) is None or status.status != "RUNNING":
            assert status is None or status.status != "DEPLOY_FAILED", status.message
            assert time.monotonic() - t0 < 180, "the app did not start in 3 minutes"
            time.sleep(0.5)
        yield Served(f"http://127.0.0.1:{http}", config)
    finally:
        serve.shutdown()
        ray.shutdown()


def tier_args(config: dict[str, Any], tier: str) -> dict[str, Any]:
    return config["applications"][0]["args"]["tiers"][tier]


def engine_stats(tier: str) -> dict[str, Any]:
    """One replica's engine counters, read through a DeploymentHandle (no HTTP route needed)."""
    from ray import serve

    return serve.get_deployment_handle(tier, app_name=APP).describe.remote().result(timeout_s=30)
