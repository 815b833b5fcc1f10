"""`mixtral-serve serve`: the Serve application in one command, as `vllm serve` is for vLLM.

    mixtral-serve serve [--model DIR] [--config FILE] [--host H] [--port P] [--tier T ...]
                        [--ingress proxy|haproxy] [--metrics-port 8080] [--dashboard-port 8265]
                        [engine flags ...]

Starts a Ray node on this machine, deploys the config's application exactly as `serve deploy`
does (through the dashboard's REST API), with the flags given laid over the file, prints the
endpoints, and on Ctrl-C or SIGTERM shuts Serve and Ray down and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

import configs
from mixtral_serve.engine_flags import add_engine_flags, lay_over, tier_settings
from mixtral_serve.ray_env import DEFAULT_INGRESS, INGRESSES, ray_env

_OUR_APP = "deployments.app:build_app"
# NOTE: Prometheus' examples and Ray's docs use 8080; it must lie outside Ray's worker port range
# (10002-19999), or a worker may take it first.
DEFAULT_METRICS_PORT = 8080
_DEPLOY_TIMEOUT_S = 900.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=configs.LOCAL,
                   help="Serve config file (default: configs/local.yaml, three tiers on the embedded model)")
    p.add_argument("--host", help="HTTP host (overrides http_options.host)")
    p.add_argument("--port", type=int, help="HTTP port (overrides http_options.port)")
    p.add_argument("--tier", action="append", default=[],
                   help="serve only these tiers (repeat or comma-separate); the first is the default")
    p.add_argument("--ingress", choices=INGRESSES, default=DEFAULT_INGRESS,
                   help="what takes HTTP on --port: Serve's Python proxy (default), or Serve's HAProxy forwarding "
                        "to the router's own HTTP server (one hop fewer; a non-streamed request whose client left "
                        "runs to its end)")
    p.add_argument("--served-model-name", help="model id clients send (overrides served_model_name)")
    p.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT,
                   help="Prometheus metrics of every process on this node: http://HOST:PORT/metrics")
    p.add_argument("--dashboard-port", type=int, default=8265,
                   help="Ray dashboard; `serve status` and `serve deploy` find it here")
    # Engine flags apply to every tier: `--model` to the application, scheduler knobs to `tuning`.
    add_engine_flags(p)


def _tiers(selected: list[str]) -> list[str]:
    return [t for item in selected for t in item.split(",") if t]


def overridden(config: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """`config` (a Serve config file's contents) with the command line's flags laid over it."""
    config = copy.deepcopy(config)
    http = config.setdefault("http_options", {})
    if args.host is not None:
        http["host"] = args.host
    if args.port is not None:
        http["port"] = args.port
    ours = [a for a in config.get("applications", []) if a.get("import_path") == _OUR_APP]
    if not ours:
        raise ValueError(f"{args.config}: no application with import_path {_OUR_APP}")
    model, settings = tier_settings(args)
    tiers = _tiers(args.tier)
    for app in ours:
        app_args = app.setdefault("args", {})
        if model is not None:
            app_args["model"] = str(Path(model).expanduser().resolve())
        if args.served_model_name is not None:
            app_args["served_model_name"] = args.served_model_name
        all_tiers = app_args.get("tiers", {})
        if tiers:
            unknown = sorted(set(tiers) - all_tiers.keys())
            if unknown:
                raise ValueError(f"--tier {unknown[0]!r} is not in {args.config}: its tiers are {sorted(all_tiers)}")
            app_args["tiers"] = all_tiers = {name: all_tiers[name] for name in tiers}
            if app_args.get("default_tier") not in all_tiers:
                app_args["default_tier"] = tiers[0]
        for tier in all_tiers.values():
            lay_over(tier, settings)
    return config


def step_thread_note(config: dict[str, Any], args: argparse.Namespace) -> str | None:
    """A word when `--model` replaces the model of tiers that keep `config`'s own step threads (`config`
    as `overridden` returns it): configs/local.yaml gives the tiny model's tiers one, which a checkpoint
    whose steps are compute should not keep (README, Speed: one cut the bench checkpoint's by a third)."""
    if args.model is None or args.cpu_threads is not None:
        return None
    ours = [app for app in config["applications"] if app.get("import_path") == _OUR_APP]
    pinned = [(name, tier["engine"].get("cpu_threads")) for app in ours for name, tier in app["args"]["tiers"].items()]
    tiers = ", ".join(f"{name} on {threads}" for name, threads in pinned if threads)
    if not tiers:
        return None
    return (f"note: step threads as {args.config} sets them ({tiers}); for a checkpoint whose steps are "
            f"compute rather than host work, give every tier the node's cores with --cpu-threads N")


def _endpoints(config: dict[str, Any], args: argparse.Namespace) -> str:
    http = config.get("http_options", {})
    host, port = http.get("host", "127.0.0.1"), http.get("port", 8000)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    lines = []
    for app in config["applications"]:
        base = f"http://{shown}:{port}{app.get('route_prefix', '/').rstrip('/')}"
        app_args = app.get("args", {})
        lines.append(f"  OpenAI API   {base}/v1  (tier {app_args.get('default_tier')}; ingress {args.ingress})")
        lines += [f"               {base}/{tier}/v1" for tier in app_args.get("tiers", {})]
    lines += [
        f"  health       http://{shown}:{port}/health",
        f"  metrics      http://127.0.0.1:{args.metrics_port}/metrics  (Prometheus; every process on this node)",
        f"  dashboard    http://127.0.0.1:{args.dashboard_port}",
        f"  status       {_status_command(args.dashboard_port)}",
        "  stop         Ctrl-C or SIGTERM",
    ]
    return "\n".join(lines)


def _status_command(dashboard_port: int) -> str:
    # NOTE: Ray turns token auth on by itself for a local node when ~/.ray/auth_token exists (and says
    # so in this process's environment); the `serve` CLI then needs to be told, or it gets a 401.
    auth = "RAY_AUTH_MODE=token " if os.environ.get("RAY_AUTH_MODE") == "token" else ""
    address = "" if dashboard_port == 8265 else f" -a http://127.0.0.1:{dashboard_port}"
    return f"{auth}serve status{address}"


def main(args: argparse.Namespace) -> None:
    from deployments.app import validate

    config = overridden(yaml.safe_load(args.config.read_text()), args)
    for app in config["applications"]:
        if app.get("import_path") == _OUR_APP:
            validate(app.get("args", {}))  # a bad flag or file is a message before Ray starts
    if note := step_thread_note(config, args):
        print(note, file=sys.stderr)

    # Before Ray starts: its processes (Serve's controller among them) inherit it and read it once.
    os.environ.update(ray_env(args.ingress, dict(os.environ)))
    import ray
    from ray import serve
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=args.dashboard_port, _metrics_export_port=args.metrics_port,
             logging_level="WARNING", configure_logging=True)
    stop = threading.Event()
    # NOTE: installed after ray.init, replacing its native handler, which reports a SIGTERM as a crash
    # (a stack dump at error level) instead of letting the process shut down.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    code = 0
    try:
        ServeSubmissionClient(f"http://127.0.0.1:{args.dashboard_port}").deploy_applications(config)
        code = _wait_running(serve, [a["name"] for a in config["applications"]], stop)
        if code == 0:
            print(f"mixtral-serve: serving ({args.config})\n{_endpoints(config, args)}", flush=True)
            stop.wait()
            print("mixtral-serve: stopping", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    sys.exit(code)


def _wait_running(serve: Any, names: list[str], stop: threading.Event) -> int:
    """0 once every application runs; 1 (with Serve's message) if one fails or it takes too long."""
    deadline = time.monotonic() + _DEPLOY_TIMEOUT_S
    while not stop.is_set():
        statuses = serve.status().applications
        failed = [(n, statuses[n]) for n in names if n in statuses and statuses[n].status == "DEPLOY_FAILED"]
        if failed:
            name, status = failed[0]
            print(f"error: application {name} failed to deploy: {status.message}", file=sys.stderr)
            return 1
        if all(n in statuses and statuses[n].status == "RUNNING" for n in names):
            return 0
        if time.monotonic() > deadline:
            print(f"error: not running after {_DEPLOY_TIMEOUT_S:.0f} s: see `serve status`", file=sys.stderr)
            return 1
        stop.wait(0.5)
    return 0
