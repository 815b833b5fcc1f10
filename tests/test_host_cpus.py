"""The engine decides its step threads: `cpu_threads`, else the host's cores, never OMP_NUM_THREADS."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from engine.host_cpus import physical_cores, step_threads


def test_physical_cores_counts_the_cpus_this_process_may_use() -> None:
    assert 1 <= physical_cores() <= len(os.sched_getaffinity(0))


def test_configured_threads_win_and_ranks_share_the_cores() -> None:
    assert step_threads(3, 1) == 3
    assert step_threads(None, 1) == physical_cores()
    assert step_threads(None, 10**6) == 1  # more ranks than cores: one thread each


def test_an_engine_ignores_rays_omp_num_threads(tiny_checkpoint: Path) -> None:
    """Ray exports OMP_NUM_THREADS=1 to every actor reserving under one CPU (a served tier's
    replica, and so its engine core process); the engine still computes on every core."""
    script = (
        "import torch\n"
        "from engine.config import EngineConfig\n"
        "from engine.llm_engine import LLMEngine\n"
        f"LLMEngine(EngineConfig(model={str(tiny_checkpoint)!r}, load_progress=False,\n"
        "                       cache={'kv_cache_bytes': '8MiB'}))\n"  # not a quarter of the host's memory
        "print(torch.get_num_threads())\n"
    )
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) == physical_cores()
