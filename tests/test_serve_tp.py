"""Tensor parallelism and fp8 through Serve: a replica whose placement group has two bundles
(rank 1 a Ray actor in bundle 1, joined over gloo) answers exactly what one process computes,
and losing rank 1 gets the replica replaced."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import ray
import torch
from ray import serve

from deployments.app import build_app
from engine import LLM, SamplingParams
from engine.checkpoint import PRESETS

PROMPTS = ["The capital of France is", "Once upon a time"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(make_checkpoint) -> Iterator[tuple[str, Path]]:
    ckpt = make_checkpoint(PRESETS["tiny"])
    engine = {"dtype": "float32", "cache": {"kv_cache_bytes": "16MiB"}, "max_model_len": 512}
    args = {
        "model": str(ckpt),
        "served_model_name": "tiny",
        "default_tier": "latency",
        "router": {"num_cpus": 0},
        "tiers": {
            "latency": {"engine": engine | {"tensor_parallel_size": 2},
                        "deployment": {"num_cpus": 0.2, "health_check_period_s": 1}},
            "throughput": {"engine": engine | {"quantization": "fp8"}, "deployment": {"num_cpus": 0.1}},
        },
    }
    port = _free_port()
    # The dashboard serves the state API the rank-loss test finds the rank's process with.
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=_free_port(), logging_level="ERROR")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name="tp", route_prefix="/")
        yield f"http://127.0.0.1:{port}", ckpt
    finally:
        serve.shutdown()
        ray.shutdown()


def _alive_pids(class_name: str) -> list[int]:
    from ray.util.state import list_actors

    return [int(a.pid) for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000) if a.class_name == class_name]


def _greedy(base: str, tier: str) -> list[str]:
    client = openai.OpenAI(base_url=f"{base}/{tier}/v1", api_key="unused", max_retries=0, timeout=120)
    return [client.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text for p in PROMPTS]


def _offline(ckpt: Path, **kw: object) -> list[str]:
    threads = torch.get_num_threads()
    llm = LLM(ckpt, dtype="float32", cache={"kv_cache_bytes": 16 << 20}, load_progress=False, **kw)
    out = [r.text for r in llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))]
    torch.set_num_threads(threads)
    return out


def test_tp2_replica_matches_single_process(served: tuple[str, Path]) -> None:
    base, ckpt = served
    assert _greedy(base, "latency") == _offline(ckpt)
    groups = ray.util.placement_group_table()
    assert any(len(g["bundles"]) == 2 and g["strategy"] == "STRICT_PACK" for g in groups.values())
    # Rank 0 cannot step without rank 1 joining its gloo group: the tokens above came from both.


def test_fp8_tier_matches_offline_fp8(served: tuple[str, Path]) -> None:
    base, ckpt = served
    fp8 = _greedy(base, "throughput")
    assert fp8 == _offline(ckpt, quantization="fp8")
    assert fp8 != _greedy(base, "latency")  # fp8 weights really change the model


def test_dead_rank_gets_the_replica_replaced(served: tuple[str, Path]) -> None:
    base, ckpt = served
    replicas, ranks = _alive_pids("ServeReplica:tp:latency"), _alive_pids("_RankActor")
    assert len(replicas) == 1 and len(ranks) == 1, (replicas, ranks)
    os.kill(ranks[0], signal.SIGKILL)  # rank 1 lost while the replica is idle (an OOM kill, a node fault)
    # No request is sent: the health check alone has to notice and Serve replace the replica.
    deadline = time.monotonic() + 90
    while True:
        assert time.monotonic() < deadline, "the replica with a dead rank was not replaced within 90 s"
        time.sleep(0.5)
        deployment = serve.status().applications["tp"].deployments["latency"]
        now = _alive_pids("ServeReplica:tp:latency")
        if deployment.replica_states.get("RUNNING", 0) == 1 and now and replicas[0] not in now:
            break
    new_ranks = _alive_pids("_RankActor")
    assert len(new_ranks) == 1 and new_ranks != ranks
    assert _greedy(base, "latency") == _offline(ckpt)
