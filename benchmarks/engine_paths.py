"""The engine's two fronts timed side by side: `LLM.generate` of all streams' prompts at once
(engine-sync) against `AsyncEngine` serving the same prompts as concurrent streams (engine-async),
in alternate rounds. `bench serving-path` starts here before the servers; the GPU check runs it on
CUDA (benchmarks/gpu_check.py). Engine imports only: no Ray, no HTTP client."""

from __future__ import annotations

import asyncio
import gc
import random
import statistics
import time

import numpy as np
from pydantic import BaseModel

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.llm import LLM
from engine.sampling_params import SamplingParams


class PathResult(BaseModel):
    path: str
    streams: int
    total_tok_s: float
    per_stream_tok_s: float
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    itl_p99_ms: float | None = None
    # Servers: % of one core each process group used while the level ran (benchmarks/process_cpu.py).
    cpu_share: dict[str, float] = {}
    # The engine's own count meanwhile: steps a second of the level's whole run (gaps between a
    # stream's requests included) and generated tokens a step (how full its batches ran), which tells
    # slower steps from batches the path kept from filling. None: not read.
    steps_per_s: float | None = None
    tokens_per_step: float | None = None


def step_rates(runs: list[tuple[float, int]], tokens_per_run: int) -> dict[str, float | None]:
    """PathResult's step fields from runs of (seconds, the engine's steps meanwhile), each run
    generating `tokens_per_run` tokens."""
    seconds, steps = sum(s for s, _ in runs), sum(k for _, k in runs)
    if steps <= 0 or seconds <= 0:
        return {"steps_per_s": None, "tokens_per_step": None}
    return {"steps_per_s": steps / seconds, "tokens_per_step": tokens_per_run * len(runs) / steps}


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


async def bench_engines(config: EngineConfig, levels: list[int], paths: list[str], *, input_len: int,
                        output_len: int, rounds: int) -> list[PathResult]:
    """engine-sync and engine-async (those of `paths`), loaded side by side and run in alternate
    rounds (each round `n` prompts at once): a host whose speed drifts between minutes (a VM's
    neighbours) then moves both alike, and the ratio between them holds."""
    llm = LLM(config=config) if "engine-sync" in paths else None
    engine = AsyncEngine(config) if "engine-async" in paths else None
    # The loads' objects out of the collector's walks, as our server's processes do (engine/engine_core.py);
    # thawed at the end, for a caller that goes on.
    gc.freeze()
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    front = llm.engine if llm else engine
    assert front is not None, "no engine path asked for"
    vocab = front.tokenizer.vocab_size
    ids = iter(range(1 << 30))

    async def one(prompt: list[int]) -> float:
        assert engine is not None
        t0 = time.perf_counter()
        ttft = None
        async for _ in engine.stream(f"r{next(ids)}", prompt, params):
            ttft = ttft if ttft is not None else time.perf_counter() - t0
        assert ttft is not None
        return ttft

    def timed_sync(prompts: list[list[int]]) -> tuple[float, int]:
        """Seconds and engine steps of one round."""
        assert llm is not None
        t, before = time.perf_counter(), llm.engine.stats().steps_total
        llm.generate(prompts, params)
        return time.perf_counter() - t, llm.engine.stats().steps_total - before

    async def timed_async(prompts: list[list[int]]) -> tuple[float, int, list[float]]:
        """Seconds, engine steps (the core's last report) and first-token times of one round."""
        assert engine is not None
        t, before = time.perf_counter(), engine.stats().steps_total
        ttfts = await asyncio.gather(*(one(p) for p in prompts))
        return time.perf_counter() - t, engine.stats().steps_total - before, ttfts

    rows = []
    try:
        warm = _prompts(max(levels), input_len, vocab, 0)
        if llm:
            timed_sync(warm)
        if engine:
            await timed_async(warm)
        for n in levels:
            sync_runs: list[tuple[float, int]] = []  # (seconds, steps) a round
            async_runs: list[tuple[float, int]] = []
            ttfts: list[float] = []
            for r in range(rounds):  # a round: one request per stream, each engine in turn
                prompts = _prompts(n, input_len, vocab, 1000 * n + r)
                if llm:
                    sync_runs.append(timed_sync(prompts))
                if engine:
                    seconds, steps, round_ttfts = await timed_async(prompts)
                    async_runs.append((seconds, steps))
                    ttfts += round_ttfts
            tokens = n * output_len  # a round's
            if llm:
                rate = statistics.median(tokens / seconds for seconds, _ in sync_runs)
                rows.append(PathResult(path="engine-sync", streams=n, total_tok_s=rate, per_stream_tok_s=rate / n,
                                       **step_rates(sync_runs, tokens)))
            if engine:
                rate = statistics.median(tokens / seconds for seconds, _ in async_runs)
                p50, p99 = np.percentile(ttfts, [50, 99]).tolist()
                rows.append(PathResult(path="engine-async", streams=n, total_tok_s=rate, per_stream_tok_s=rate / n,
                                       ttft_p50_ms=p50 * 1e3, ttft_p99_ms=p99 * 1e3,
                                       **step_rates(async_runs, tokens)))
    finally:
        gc.unfreeze()
        if engine:
            await engine.shutdown()
        if llm:
            llm.engine.shutdown()
    return rows
