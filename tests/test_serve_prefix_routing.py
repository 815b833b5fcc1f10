"""Prefix-affinity routing end to end: a tier of two replicas on a real Ray Serve, driven by
`bench serve`'s multi-turn workload. Every later turn of a conversation finds the earlier turns in
its replica's prefix cache, and the conversations spread over both replicas."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.prefix_routing_bench import series_by_label, served_locally
from benchmarks.serve_bench import BenchConfig, run_benchmark

ray = pytest.importorskip("ray")


CONVERSATIONS, TURNS = 6, 4


@pytest.fixture(scope="module")
def served(tiny_checkpoint: Path) -> Iterator[tuple[str, str]]:
    engine = {"dtype": "float32", "max_model_len": 2048, "cpu_threads": 1,
              "cache": {"kv_cache_bytes": "32MiB", "block_size": 16}}
    args = {"model": str(tiny_checkpoint), "served_model_name": "tiny", "default_tier": "chat",
            "tiers": {"chat": {"engine": engine, "tuning": {"max_num_seqs": 16, "stream_flush_ms": 0},
                               "autoscaling": {"min_replicas": 2, "max_replicas": 2},
                               "deployment": {"num_cpus": 0.1}, "routing": {"block_chars": 64}}}}
    with served_locally(args, "prefix") as urls:
        yield urls


def test_conversations_keep_their_replica_and_its_prefix_cache(served: tuple[str, str]) -> None:
    base, metrics = served
    config = BenchConfig(base_url=f"{base}/chat/v1", endpoint="chat", multi_turn=(CONVERSATIONS, TURNS),
                         system_prompt_len=60, input_len=40, output_len=12, progress=False)
    run = asyncio.run(run_benchmark(config)).runs[0]
    assert run.successful == CONVERSATIONS * TURNS, run.errors
    by_index = {r.index: r for r in run.requests}
    for c in range(CONVERSATIONS):
        for turn in range(1, TURNS):
            before, now = by_index[c * TURNS + turn - 1], by_index[c * TURNS + turn]
            assert now.cached_tokens is not None and before.input_tokens is not None
            # The earlier turn's prompt (less its last partial 16-token block) was cached.
            assert now.cached_tokens >= before.input_tokens - 16, (c, turn, now.cached_tokens, before.input_tokens)
    assert run.prefix_cache_hit_rate is not None and run.prefix_cache_hit_rate > 0.6
    per_replica = series_by_label(metrics, "ray_mixtral_request_success_total", "replica", CONVERSATIONS * TURNS)
    assert len(per_replica) == 2 and min(per_replica.values()) >= TURNS, per_replica  # both replicas serve
    decisions = series_by_label(metrics, "ray_mixtral_prefix_routing_decisions_total", "decision",
                                CONVERSATIONS * TURNS)
    assert decisions.get("affinity", 0) >= CONVERSATIONS * (TURNS - 1), decisions
