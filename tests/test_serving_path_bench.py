"""`bench serving-path`'s engine paths on the tiny checkpoint: both engines side by side in
alternate rounds, every level reported for each (benchmarks/engine_paths.py)."""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.engine_paths import PathResult, bench_engines
from benchmarks.serving_path import add_arguments, at_rest, print_table, served_config, unlike_waits, vllm_openmp
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.llm import LLM

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_engine_paths_alternate_and_report_every_level(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []  # which engine each request went to, in order
    generate, stream = LLM.generate, AsyncEngine.stream

    def noted_generate(self: LLM, *args: Any, **kwargs: Any) -> Any:
        order.append("sync")
        return generate(self, *args, **kwargs)

    def noted_stream(self: AsyncEngine, *args: Any, **kwargs: Any) -> Any:
        order.append("async")
        return stream(self, *args, **kwargs)

    monkeypatch.setattr(LLM, "generate", noted_generate)
    monkeypatch.setattr(AsyncEngine, "stream", noted_stream)
    config = EngineConfig(model=str(tiny_checkpoint), dtype="float32", load_progress=False,
                          cache={"kv_cache_bytes": "8MiB"}, scheduler={"max_num_seqs": 4, "max_num_batched_tokens": 64})
    rows = asyncio.run(bench_engines(config, [1, 3], ["engine-sync", "engine-async"], input_len=8, output_len=6,
                                     rounds=2))

    assert [(r.path, r.streams) for r in rows] == [("engine-sync", 1), ("engine-async", 1),
                                                   ("engine-sync", 3), ("engine-async", 3)]
    assert all(r.total_tok_s > 0 and r.per_stream_tok_s * r.streams == pytest.approx(r.total_tok_s) for r in rows)
    assert all(r.ttft_p50_ms is not None and 0 < r.ttft_p50_ms <= r.ttft_p99_ms  # type: ignore[operator]
               for r in rows if r.path == "engine-async")
    # Each step yields at most one token a stream; a greedy round of n streams takes at least output_len steps.
    assert all(r.steps_per_s is not None and r.steps_per_s > 0 for r in rows)
    assert all(r.tokens_per_step is not None and 1 <= r.tokens_per_step <= r.streams for r in rows)
    turns = [who for i, who in enumerate(order) if i == 0 or order[i - 1] != who]
    assert turns == ["sync", "async"] * (1 + 2 * 2)  # the warm-up, then each level's two rounds


def test_the_vllm_peer_gets_its_venvs_intel_openmp(tmp_path: Path) -> None:
    """A venv's python is a link to the interpreter it was made from: the library is looked up in the
    venv, not beside that interpreter."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    assert vllm_openmp(str(venv / "bin" / "python")) is None  # no Intel OpenMP installed: none preloaded
    (venv / "lib").mkdir()
    (venv / "lib" / "libiomp5.so").write_bytes(b"")
    assert vllm_openmp(str(venv / "bin" / "python")) == venv / "lib" / "libiomp5.so"


def test_engine_flags_lay_over_the_benchmarked_tier() -> None:
    """Every path runs the tier's settings with the flags given over them; the command's own `--model`
    (a folder, not EngineConfig's) stays out of them."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", "/tmp/some-checkpoint", "--dtype", "bfloat16", "--cpu-threads", "2",
                              "--max-num-seqs", "8"])
    config = served_config(args)
    tier = config["applications"][0]["args"]["tiers"]["throughput"]
    assert tier["engine"]["cpu_threads"] == 2 and tier["engine"]["dtype"] == "bfloat16"  # local.yaml: 1, float32
    assert tier["engine"]["cache"]["kv_cache_bytes"] == "128MiB"  # what no flag names is kept
    assert tier["tuning"]["max_num_seqs"] == 8 and tier["tuning"]["stream_flush_ms"] == 50
    assert config["applications"][0]["args"]["model"] is None


def test_a_server_at_rest_is_a_level_of_zero_streams(capsys: pytest.CaptureFixture[str]) -> None:
    """Before its first level a server's CPU is read with no request in flight: a process named like
    Serve's controller, busy ~0.3 s of the second, shows there; the report keeps that row out of the
    tokens/s table and names it in the CPU table, with the sum of every group."""
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\ntime.sleep(30)"
    proc = subprocess.Popen([sys.executable, "-c", burn, "ray::ServeController"], start_new_session=True)
    try:
        rows = at_rest("serve", 1.0)
    finally:
        proc.kill()
        proc.wait()
    assert at_rest("serve", 0) == []
    [rest] = rows
    assert (rest.path, rest.streams, rest.total_tok_s) == ("serve", 0, 0.0)
    assert rest.cpu_share["serve controller"] > 10, rest.cpu_share

    loaded = PathResult(path="serve", streams=4, total_tok_s=100.0, per_stream_tok_s=25.0,
                        cpu_share={"engine core": 150.0, "replica router": 20.0})
    print_table([rest, loaded])
    out = capsys.readouterr().out
    tokens_table, cpu_table = out.split("where the host's CPU went")
    assert [line.split("│")[2].strip() for line in tokens_table.splitlines() if line.startswith("│ serve")] == ["4"]
    cpu_rows = [[cell.strip() for cell in line.split("│")[1:4]] for line in cpu_table.splitlines()
                if line.startswith("│ serve")]
    assert cpu_rows[0][:2] == ["serve", "at rest"] and cpu_rows[1] == ["serve", "4", "170%"]


def test_unlike_wait_policies_are_named_under_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """engine-sync waits as this process's OpenMP does; our engine cores as `cpu_wait` says. Where the
    two differ on more than one step thread the report says so, since the ratios then carry it."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    two = EngineConfig(cpu_threads=2)  # cpu_wait: sleep, the default
    assert "cpu_wait: sleep" in (unlike_waits(two, ["engine-sync", "serve"]) or "")
    assert unlike_waits(two.model_copy(update={"cpu_wait": "spin"}), ["engine-sync", "serve"]) is None
    assert unlike_waits(EngineConfig(cpu_threads=1), ["engine-sync", "serve"]) is None  # no team to wait in
    assert unlike_waits(two, ["engine-async", "serve"]) is None  # no engine-sync to compare with
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")  # this process sleeps at once too
    assert unlike_waits(two, ["engine-sync", "serve"]) is None
