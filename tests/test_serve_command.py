"""`mixtral-serve serve`: flags laid over the config, and a real run from start to SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
import requests
import yaml

import configs
from mixtral_serve.cli import build_parser
from mixtral_serve.ray_env import INGRESSES, ray_env
from mixtral_serve.serve_command import overridden, step_thread_note

MODEL = "mixtral-tiny"


def _args(*flags: str):
    return build_parser().parse_args(["serve", *flags])


def _tiers(config: dict) -> dict:
    return config["applications"][0]["args"]["tiers"]


def test_flags_override_the_file_without_editing_it(tmp_path: Path) -> None:
    original = yaml.safe_load(configs.LOCAL.read_text())
    config = overridden(original, _args(
        "--model", str(tmp_path), "--port", "9001", "--host", "0.0.0.0", "--tier", "throughput,latency",
        "--dtype", "bfloat16", "--max-num-seqs", "7", "--kv-cache-bytes", "8MiB", "--served-model-name", "m"))
    args = config["applications"][0]["args"]
    assert config["http_options"] == {"host": "0.0.0.0", "port": 9001}
    assert args["model"] == str(tmp_path.resolve()) and args["served_model_name"] == "m"
    assert list(args["tiers"]) == ["throughput", "latency"]
    assert args["default_tier"] == "latency"  # still served, so still the default
    for tier in args["tiers"].values():
        assert tier["engine"]["dtype"] == "bfloat16"
        assert tier["engine"]["cache"]["kv_cache_bytes"] == 8 << 20
        assert tier["tuning"]["max_num_seqs"] == 7
    assert _tiers(original)["throughput"]["tuning"]["max_num_seqs"] == 64  # the file's dict is untouched


def test_dropping_the_default_tier_makes_the_first_kept_one_the_default() -> None:
    config = overridden(yaml.safe_load(configs.LOCAL.read_text()), _args("--tier", "fixed-latency"))
    assert config["applications"][0]["args"]["default_tier"] == "fixed-latency"
    assert list(_tiers(config)) == ["fixed-latency"]


def test_a_model_given_to_tiers_with_pinned_step_threads_gets_a_word(tmp_path: Path) -> None:
    """local.yaml steps the tiny model's latency and throughput tiers on one thread; another model
    given without --cpu-threads is told so, naming those tiers only."""

    def note(*flags: str) -> str | None:
        args = _args(*flags)
        return step_thread_note(overridden(yaml.safe_load(configs.LOCAL.read_text()), args), args)

    told = note("--model", str(tmp_path))
    assert told is not None and "latency on 1, throughput on 1)" in told and "fixed-latency" not in told
    assert "--cpu-threads" in told
    assert note("--model", str(tmp_path), "--cpu-threads", "2") is None  # chosen: nothing to say
    assert note() is None  # the embedded model the config was sized for
    assert note("--model", str(tmp_path), "--tier", "fixed-latency") is None  # no pinned tier served


def test_bad_flags_are_one_line_errors_before_ray_starts(tmp_path: Path) -> None:
    for flags, message in ((["--tier", "nope"], "--tier 'nope' is not in"),
                           (["--model", str(tmp_path / "missing")], "does not exist"),
                           (["--max-num-seqs", "0"], "max_num_seqs")):
        out = subprocess.run([sys.executable, "-m", "mixtral_serve.cli", "serve", *flags],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out.stderr
        assert message in out.stderr and "Traceback" not in out.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Output:
    """A child's merged output, read on a thread so its pipe never fills."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, needle: str, process: subprocess.Popen[str], timeout: float, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while self.text.count(needle) < count:
            assert process.poll() is None, f"exited {process.returncode}:\n{self.text[-4000:]}"
            assert time.monotonic() < deadline, f"no {needle!r} in {timeout:.0f} s:\n{self.text[-4000:]}"
            time.sleep(0.2)

    def join(self) -> None:
        self._thread.join(timeout=30)


def _listener(port: int) -> str:
    """The name of the process listening on 127.0.0.1:`port` (Linux /proc: the socket's inode)."""
    hex_port = f"{port:04X}"
    inodes = {line.split()[9] for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
              if line.split()[1].endswith(f":{hex_port}") and line.split()[3] == "0A"}  # 0A: LISTEN
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd).removeprefix("socket:[").removesuffix("]") in inodes for fd in fd_dir.iterdir()):
                return (fd_dir.parent / "comm").read_text().strip()
        except OSError:  # gone meanwhile, or not ours to read
            continue
    raise AssertionError(f"nothing listens on port {port}")


def _environ(comm: str) -> dict[str, str]:
    """The environment of the one process whose `comm` is `comm`."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if (proc / "comm").read_text().strip() == comm:
                found.append((proc / "environ").read_bytes())
        except OSError:  # gone meanwhile, or not ours to read
            continue
    assert len(found) == 1, f"{len(found)} processes named {comm!r}"
    return dict(entry.split("=", 1) for entry in found[0].decode().split("\0") if "=" in entry)


# What listens on the port (a process's `comm`, 15 characters at most) under each ingress.
_LISTENER = {"proxy": "ray::ProxyActor", "haproxy": "haproxy"}


@pytest.mark.parametrize("ingress", INGRESSES)
def test_serve_runs_answers_exports_metrics_and_stops_on_sigterm(ingress: str) -> None:
    http, metrics, dashboard = _free_port(), _free_port(), _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mixtral_serve.cli", "serve", "--tier", "latency", "--port", str(http),
         "--metrics-port", str(metrics), "--dashboard-port", str(dashboard), "--max-num-seqs", "3",
         "--ingress", ingress],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    output = _Output(process)
    try:
        output.wait_for("stop         Ctrl-C or SIGTERM", process, timeout=300)
        assert f"http://127.0.0.1:{http}/v1  (tier latency; ingress {ingress})" in output.text
        assert f"http://127.0.0.1:{metrics}/metrics" in output.text

        assert _listener(http) == _LISTENER[ingress]
        # Serve's controller runs with the node's environment (mixtral_serve/ray_env.py), not Ray's defaults.
        assert _environ("ray::ServeContr")["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.5"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http}/v1", api_key="none", max_retries=0)
        answer = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0)
        assert answer.usage.completion_tokens == 5
        streamed = list(client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0,
                                                  stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in streamed if c.choices) == answer.choices[0].text
        assert streamed[-1].usage.completion_tokens == 5
        stats = requests.get(f"http://127.0.0.1:{http}/latency/stats", timeout=30).json()
        assert stats["tuning"]["max_num_seqs"] == 3  # the flag reached the replica
        assert requests.get(f"http://127.0.0.1:{http}/throughput/v1/models", timeout=30).status_code == 404

        # The status command exactly as printed (with the auth setting Ray chose, if any).
        command = next(line for line in output.lines if line.lstrip().startswith("status ")).split(None, 1)[1]
        status = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and "RUNNING" in status.stdout, status.stdout + status.stderr

        # Clients that leave mid-answer: one info line each, no traceback (checked below over the whole
        # output, which carries the router's and replicas' logs). Not the non-streamed one through
        # HAProxy: it takes the client's close for a half-close and waits for the answer
        # (mixtral_serve/ray_env.py), so that request runs to its end there.
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 2000, "ignore_eos": True}
        with requests.post(f"http://127.0.0.1:{http}/v1/completions", json=body | {"stream": True}, stream=True,
                           timeout=60) as streamed:
            next(streamed.iter_lines())
        if ingress == "proxy":
            with pytest.raises(requests.exceptions.ReadTimeout):
                requests.post(f"http://127.0.0.1:{http}/v1/completions", json=body, timeout=0.5)
            output.wait_for("disconnected", process, timeout=60, count=2)
        else:
            output.wait_for("POST /v1/completions 499", process, timeout=60)
        # ...and the engine dropped them: nothing running, no KV block held (2,000 tokens would take
        # seconds more).
        deadline = time.monotonic() + 30
        while (stats := requests.get(f"http://127.0.0.1:{http}/latency/stats", timeout=30).json())[
                "num_running"] or stats["num_waiting"] or stats["kv_blocks_used"]:
            assert time.monotonic() < deadline, stats
            time.sleep(0.2)

        # The replica's own metric reaches the fixed port (Ray exports every 10 s by default).
        deadline = time.monotonic() + 60
        while "mixtral_request_success_total" not in (body := requests.get(
                f"http://127.0.0.1:{metrics}/metrics", timeout=30).text):
            assert time.monotonic() < deadline, body[-2000:]
            time.sleep(1)

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0, output.text[-4000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        output.join()
    text = output.text
    assert "mixtral-serve: stopping" in text
    assert "SIGTERM received" not in text and "Traceback" not in text, text[-4000:]


def test_ray_env_sets_the_ingress_chosen_and_keeps_the_operators_niceness() -> None:
    quiet = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5", "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000"}
    assert ray_env("haproxy", {"PATH": "/bin"}) == {"PATH": "/bin", "RAY_worker_niceness": "0", **quiet,
                                                    "RAY_SERVE_ENABLE_HA_PROXY": "1",
                                                    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5"}
    # An operator's drain window is kept.
    assert ray_env("haproxy", {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "30"})[
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "30"
    proxy = ray_env("proxy", {"RAY_worker_niceness": "5", "RAY_SERVE_ENABLE_HA_PROXY": "1",
                              "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.1"})
    assert proxy == {"RAY_worker_niceness": "5", "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.1",
                     "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000", "RAY_SERVE_ENABLE_HA_PROXY": "0",
                     "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
    with pytest.raises(ValueError, match="ingress must be one of"):
        ray_env("nginx", {})
    assert _args().ingress == "proxy" and _args("--ingress", "haproxy").ingress == "haproxy"
