"""The operator's path: `ray start --head`, `serve deploy configs/local.yaml`, a request,
`serve status`, `serve shutdown -y`, `ray stop`, each a real CLI call with a timeout.

NOTE: `ray stop` stops every Ray process on the machine, so the whole sequence runs in a
private PID namespace (`unshare`): it sees, and stops, only the cluster it started, and
whatever is left is killed with the namespace when the sequence ends, even on failure.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ISOLATE = ["unshare", "--fork", "--pid", "--mount-proc", "--kill-child"]


def _isolation_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run([*ISOLATE, "true"], capture_output=True, timeout=30).returncode == 0


def test_ray_start_serve_deploy_request_shutdown_stop() -> None:
    if not _isolation_works():
        pytest.skip("needs `unshare` (root) so that `ray stop` cannot touch other Ray clusters on this machine")
    run = subprocess.run([*ISOLATE, sys.executable, __file__], capture_output=True, text=True, timeout=420, cwd=ROOT)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no result from the driver (exit {run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    result = json.loads(lines[-1])
    print("\nserve deploy path:", json.dumps(result))
    assert result.get("error") is None, result
    assert result["status"] == "RUNNING"
    assert result["completion_tokens"] == 8 and result["chat_tier"] == "throughput"
    assert result["steps"]["serve shutdown"] == 0 and result["steps"]["ray stop"] == 0


# ---- the driver: runs inside the namespace ---------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(result: dict[str, Any], name: str, args: list[str], env: dict[str, str], timeout: float) -> None:
    t0 = time.monotonic()
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    result["seconds"][name] = round(time.monotonic() - t0, 1)
    result["steps"][name] = done.returncode
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed ({done.returncode}): {done.stderr[-2000:]}")


def _drive() -> dict[str, Any]:
    import openai
    import requests
    import yaml

    result: dict[str, Any] = {"steps": {}, "seconds": {}, "error": None}
    gcs, dashboard, http, metrics = (_free_port() for _ in range(4))
    tmp = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    config = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    config["http_options"]["port"] = http
    (tmp / "local.yaml").write_text(yaml.safe_dump(config))
    # NOTE: a cluster from `ray start` turns token authentication on; the CLI then needs this.
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    address = ["-a", f"http://127.0.0.1:{dashboard}"]
    ray, serve = str(BIN / "ray"), str(BIN / "serve")
    try:
        # The metrics export port must lie outside Ray's worker port range (10002-19999).
        _cli(result, "ray start", [ray, "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                                   f"--dashboard-port={dashboard}", f"--metrics-export-port={metrics}",
                                   f"--temp-dir={tmp / 'ray'}", "--num-cpus=2", "--disable-usage-stats"], env, 120)
        t0 = time.monotonic()
        _cli(result, "serve deploy", [serve, "deploy", str(tmp / "local.yaml"), *address], env, 120)
        base = f"http://127.0.0.1:{http}"
        while True:
            try:
                if requests.get(f"{base}/health", timeout=10).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or tiers still starting
                pass
            if time.monotonic() - t0 > 180:
                raise TimeoutError("the app did not answer /health within 180 s of `serve deploy`")
            time.sleep(0.5)
        result["seconds"]["deploy to healthy"] = round(time.monotonic() - t0, 1)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
        result["completion_tokens"] = client.completions.create(
            model="mixtral-tiny", prompt="Hello", max_tokens=8, extra_body={"ignore_eos": True}).usage.completion_tokens
        chat = openai.OpenAI(base_url=f"{base}/throughput/v1", api_key="unused", max_retries=0, timeout=60)
        raw = chat.chat.completions.with_raw_response.create(
            model="mixtral-tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        result["chat_tier"] = raw.headers["x-tier"]
        status = subprocess.run([serve, "status", *address], env=env, capture_output=True, text=True, timeout=60)
        result["status"] = yaml.safe_load(status.stdout)["applications"]["mixtral"]["status"]
    except Exception as err:  # noqa: BLE001 - reported to the test, after the cleanup below
        result["error"] = f"{type(err).__name__}: {err}"
    finally:
        for name, args in (("serve shutdown", [serve, "shutdown", "-y", *address]), ("ray stop", [ray, "stop", "--grace-period", "5"])):
            try:
                _cli(result, name, args, env, 120)
            except Exception as err:  # noqa: BLE001
                result["error"] = result["error"] or f"{type(err).__name__}: {err}"
        shutil.rmtree(tmp, ignore_errors=True)
    return result


if __name__ == "__main__":
    print(json.dumps(_drive()), flush=True)
