"""How many threads a step computes on: the engine's, not the environment's."""

from __future__ import annotations

import os
from pathlib import Path

_CPU_SYSFS = Path("/sys/devices/system/cpu")


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (hyper-threads of one core share its
    matrix units, so PyTorch's own default counts cores, not logical CPUs)."""
    cpus = os.sched_getaffinity(0)
    cores: set[tuple[str, str]] = set()
    for cpu in cpus:
        topology = _CPU_SYSFS / f"cpu{cpu}" / "topology"
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:  # no sysfs topology (some containers): count logical CPUs
            return len(cpus)
    return len(cores)


def step_threads(configured: int | None, ranks_on_host: int) -> int:
    """`EngineConfig.cpu_threads`, else this host's cores shared evenly by its tensor-parallel ranks.

    NOTE: OMP_NUM_THREADS is deliberately not consulted: Ray sets it to 1 in every actor that
    reserves less than one CPU (our tiers reserve fractions so several share a node), and a served
    engine then decoded on one of two cores: 21 against 31 tokens/s on the bench checkpoint
    (AMD Zen 4, 2 cores).
    """
    return configured or max(1, physical_cores() // ranks_on_host)
