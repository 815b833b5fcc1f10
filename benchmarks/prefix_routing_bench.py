"""`mixtral-serve bench prefix-routing`: the multi-turn workload on a tier of two replicas, routed by
prefix affinity against Serve's default router, same run, same load; one replica alone as the
reference for the prefix cache hit rate.

Each arm starts its own local Ray and Serve (the tiny config below, or `--model`), runs
`bench serve --multi-turn N:T` against it, and reads the replicas' request counts from Ray's
metrics endpoint: prefix cache hit rate (the server's usage.prompt_tokens_details), TTFT p50/p99
and the per-replica load spread (busiest replica's requests over the mean).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from benchmarks.serve_bench import BenchConfig, run_benchmark

_TIER = "chat"


class ArmResult(BaseModel):
    arm: str
    replicas: int
    prefix_cache_hit_rate: float | None
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    requests_per_replica: list[float]
    failed: int

    @property
    def spread(self) -> float:
        """The busiest replica's requests over the mean (1 = even)."""
        counts = self.requests_per_replica
        return max(counts) / (sum(counts) / len(counts)) if counts and sum(counts) else float("nan")


def _app_args(model: Path | None, dtype: str, replicas: int, affinity: bool, cpu_threads: int) -> dict[str, Any]:
    engine = {"dtype": dtype, "max_model_len": 4096, "cpu_threads": cpu_threads,
              "cache": {"kv_cache_bytes": "64MiB", "block_size": 16}}
    return {
        "model": None if model is None else str(model), "served_model_name": "bench", "default_tier": _TIER,
        "tiers": {_TIER: {
            "engine": engine, "tuning": {"max_num_seqs": 32, "max_num_batched_tokens": 2048},
            "autoscaling": {"min_replicas": replicas, "max_replicas": replicas},
            "deployment": {"num_cpus": 0.1}, "routing": {"prefix_affinity": affinity},
        }},
    }


def series_by_label(metrics_url: str, name: str, label: str, want_total: float) -> dict[str, float]:
    """A counter's values summed by one label, from Ray's metrics endpoint; waits (30 s at most) until
    they add up to `want_total` (Ray reports every second or so)."""
    pattern = re.compile(rf'^{name}\{{(?P<labels>[^}}]*)\}} (?P<value>\S+)$', re.M)
    deadline = time.monotonic() + 30
    values: dict[str, float] = {}
    while time.monotonic() < deadline:
        values = {}
        for match in pattern.finditer(urllib.request.urlopen(metrics_url, timeout=10).read().decode()):
            key = re.search(rf'{label}="([^"]+)"', match["labels"])
            if key:
                values[key[1]] = values.get(key[1], 0.0) + float(match["value"])
        if sum(values.values()) >= want_total:
            break
        time.sleep(1)
    return values


@contextmanager
def served_locally(app_args: dict[str, Any], name: str) -> Iterator[tuple[str, str]]:
    """The app on a local Ray node of its own with metrics reported every second: (HTTP base URL, Ray's
    metrics URL); Serve and Ray are shut down on leaving."""
    import ray
    from ray import serve

    from deployments.app import build_app
    from engine.ranks import free_port

    http_port, metrics_port = free_port(), free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR",
             _metrics_export_port=metrics_port, _system_config={"metrics_report_interval_ms": 1000})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        serve.run(build_app(app_args), name=name, route_prefix="/")
        yield f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        serve.shutdown()
        ray.shutdown()


def run_arm(name: str, args: argparse.Namespace, replicas: int, affinity: bool) -> ArmResult:
    app = _app_args(args.model, args.dtype, replicas, affinity, args.cpu_threads)
    with served_locally(app, "bench") as (base, metrics):
        config = BenchConfig(base_url=f"{base}/v1", tiers=[_TIER], endpoint="chat",
                             multi_turn=(args.conversations, args.turns), system_prompt_len=args.system_prompt_len,
                             think_time_s=args.think_time,
                             input_len=args.input_len, output_len=args.output_len, seed=args.seed,
                             progress=False)
        run = asyncio.run(run_benchmark(config)).runs[0]
        finished = series_by_label(metrics, "ray_mixtral_request_success_total", "replica", run.successful)
        per_replica = sorted(finished.values(), reverse=True)
    return ArmResult(arm=name, replicas=replicas, prefix_cache_hit_rate=run.prefix_cache_hit_rate,
                     ttft_p50_ms=run.ttft_ms.p50 if run.ttft_ms else None,
                     ttft_p99_ms=run.ttft_ms.p99 if run.ttft_ms else None,
                     requests_per_replica=per_replica, failed=run.failed + run.rejected)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="checkpoint folder (default: the embedded tiny model)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--input-len", type=int, default=150, help="words of each new question")
    p.add_argument("--output-len", type=int, default=48, help="tokens of each answer")
    p.add_argument("--system-prompt-len", type=int, default=300, help="words of the shared system prompt")
    p.add_argument("--think-time", type=float, default=1.0, help="mean seconds a user pauses between turns")
    p.add_argument("--cpu-threads", type=int, default=1, help="engine threads per replica")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", type=Path)


def main(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    arms = [run_arm("one replica", args, 1, True),
            run_arm("2 replicas, Serve's default router", args, 2, False),
            run_arm("2 replicas, prefix affinity", args, 2, True)]
    table = Table(title=f"{args.conversations} conversations x {args.turns} turns, system prompt "
                        f"{args.system_prompt_len} words, questions {args.input_len} words, "
                        f"answers {args.output_len} tokens")
    for col in ("arm", "prefix cache hit rate", "TTFT p50 ms", "TTFT p99 ms", "requests per replica", "max / mean",
                "failed"):
        table.add_column(col, justify="left" if col == "arm" else "right")
    for a in arms:
        table.add_row(a.arm, f"{a.prefix_cache_hit_rate:.1%}" if a.prefix_cache_hit_rate is not None else "-",
                      f"{a.ttft_p50_ms:.1f}" if a.ttft_p50_ms else "-",
                      f"{a.ttft_p99_ms:.1f}" if a.ttft_p99_ms else "-",
                      " / ".join(f"{c:.0f}" for c in a.requests_per_replica), f"{a.spread:.2f}", str(a.failed))
    Console(width=max(Console().width, 140)).print(table)
    if args.json_out:
        args.json_out.write_text(json.dumps([a.model_dump() | {"spread": a.spread} for a in arms], indent=2))
