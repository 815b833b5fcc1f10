"""Kernel timing on a GPU without Python's launch overhead: CUDA-graph replays timed by CUDA events."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


def timed(fn: Callable[[], Any], reps: int) -> tuple[float, float]:
    """(median ms, peak GiB allocated) of `reps` calls after one warm-up.

    NOTE: on a GPU, replays of a CUDA graph of one call, timed with CUDA events: the kernels'
    own time, as the engine's graphed decode step runs them, without Python's launch overhead
    (which alone took ~1 ms per fused-MoE call on an H200). Eager calls where capture fails.
    """
    fn()
    if not torch.cuda.is_available():
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1000)
        return sorted(times)[len(times) // 2], float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    run = fn
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run = graph.replay
    except RuntimeError as err:
        print(f"    (no graph, timed eagerly: {str(err)[:100]})", flush=True)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2], torch.cuda.max_memory_allocated() / 2**30
