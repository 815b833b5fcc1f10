"""CPU time per process group over a stretch of a benchmark (Linux /proc): where a served token's
time goes between the engine and the client's socket.

    with ProcessCpu() as cpu:
        ...drive the server...
    cpu.shares  # {"engine core (throughput)": 104.6, "replica router": 18.7, ...}: % of one core

Groups by what a process is to a server: Serve's replicas by deployment (the router is one), the
engine core under the replica that started it, Serve's proxy (or HAProxy) and controller, Ray's
daemons, vLLM's processes, and this process (the benchmark's client).
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from pathlib import Path
from types import TracebackType

_PROC = Path("/proc")
_TICKS = os.sysconf("SC_CLK_TCK")
# Ray titles a worker by its actor, and by the method too while it runs one
# ("ray::ServeReplica:mixtral:router.handle_request_with_rejection"); tier names have no dots.
_REPLICA = re.compile(r"ray::ServeReplica:[^:\s]+:([^\s.]+)")
_RAY_DAEMONS = ("gcs_server", "raylet", "dashboard", "DashboardAgent", "log_monitor", "monitor.py", "runtime_env")


def label(cmdline: str, parent: str | None, client_pid: int, pid: int) -> str:
    """The group of a process, from its command line and its parent's group."""
    if pid == client_pid:
        return "client (this process)"
    if match := _REPLICA.search(cmdline):
        return f"replica {match.group(1)}"
    if "engine.engine_core" in cmdline:
        return f"engine core ({parent.removeprefix('replica ')})" if parent and parent.startswith("replica ") \
            else "engine core"
    if "ProxyActor" in cmdline:
        return "serve proxy"
    if "haproxy" in cmdline.lower():  # Serve's HAProxy and the actor that configures it
        return "serve haproxy"
    if "ServeController" in cmdline:
        return "serve controller"
    if "vllm" in cmdline.lower():
        return "vllm"
    if any(name in cmdline for name in _RAY_DAEMONS):
        return "ray daemons"
    return "other"


def _processes() -> dict[int, tuple[str, int, float]]:
    """pid -> (command line, parent pid, CPU seconds so far)."""
    out = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()  # from the state field on
        out[int(entry.name)] = (cmdline or name, int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICKS)
    return out


class ProcessCpu:
    """Percent of one core each process group used between entering and leaving the block."""

    def __init__(self) -> None:
        self.shares: dict[str, float] = {}
        self._before: dict[int, tuple[str, int, float]] = {}
        self._start = 0.0

    def __enter__(self) -> ProcessCpu:
        self._before, self._start = _processes(), time.monotonic()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        after, wall = _processes(), time.monotonic() - self._start
        me = os.getpid()
        labels: dict[int, str] = {}

        def group(pid: int) -> str:
            if pid not in labels:
                cmdline, ppid, _ = after[pid]
                parent = group(ppid) if ppid in after and ppid != pid else None  # `label` decides if it matters
                labels[pid] = label(cmdline, parent, me, pid)
            return labels[pid]

        used: Counter[str] = Counter()
        for pid, (_, _, cpu) in after.items():
            spent = cpu - self._before.get(pid, ("", 0, 0.0))[2]
            if spent > 0:
                used[group(pid)] += spent
        self.shares = {name: round(100 * seconds / wall, 1) for name, seconds in used.most_common()}
