"""Starting, watching and stopping tensor-parallel ranks > 0 of one engine.

Rank 0 (the engine's own process) rendezvouses with the ranks a launcher starts: local
processes for offline use (`launch_local`), or whatever the caller passes (the serving
layer's Ray actors). Each rank runs `run_worker`: load its shard, then every step rank 0
broadcasts.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from engine.config import EngineConfig
from engine.model_runner import build_worker_runner
from engine.outputs import EngineDeadError
from engine.parallel import TPGroup, init_group, rank_device


@dataclass(frozen=True)
class RankPlacement:
    """Where a launcher's ranks run, as rank 0 must know it to meet them."""

    # The address the ranks reach rank 0's rendezvous at: loopback for local processes, the node's
    # address when a launcher may place ranks on other nodes.
    host: str = "127.0.0.1"
    # Each rank sees only its own GPU (as Ray's actors do); else local ranks share the host's GPUs.
    own_devices: bool = False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_ranks(config: EngineConfig, launcher: "WorkerLauncher", placement: RankPlacement
                ) -> tuple[TPGroup, list["WorkerHandle"]]:
    """Rank 0's group and the other ranks' handles (none without tensor parallelism); each rank
    gets the configuration with its own device."""
    world = config.tensor_parallel_size
    device = rank_device(config.device, 0, placement.own_devices)
    if world == 1:
        return init_group(0, 1, "", device), []
    init_method = f"tcp://{placement.host}:{free_port(placement.host)}"
    workers: list[WorkerHandle] = []
    for rank in range(1, world):
        own = config.model_copy(update={"device": str(rank_device(config.device, rank, placement.own_devices))})
        workers.append(launcher(rank, world, init_method, own.model_dump_json()))
    return join_group(workers, init_method, device), workers


def join_group(workers: list["WorkerHandle"], init_method: str, device: torch.device) -> TPGroup:
    """Rank 0's side of the rendezvous, failing fast when a rank dies before it joins.

    NOTE: rank 0 would otherwise wait out the store's timeout (30 minutes) for a rank that
    crashed while starting (a bad environment, no memory); here it polls the ranks meanwhile.
    """
    world_size = len(workers) + 1
    joined: list[TPGroup | BaseException] = []

    def join() -> None:
        try:
            joined.append(init_group(0, world_size, init_method, device))
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
            joined.append(err)

    thread = threading.Thread(target=join, name="tp-rendezvous", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.2)
        dead = [rank for rank, w in enumerate(workers, start=1) if not w.is_alive()]
        if dead and thread.is_alive():
            raise EngineDeadError(f"tensor-parallel rank(s) {dead} died before joining the group")
    if isinstance(joined[0], BaseException):
        raise joined[0]
    return joined[0]


class WorkerHandle(Protocol):
    """A running rank > 0 (a local process, or a Ray actor the serving layer started)."""

    def is_alive(self) -> bool: ...

    def stop(self) -> None: ...


class WorkerLauncher(Protocol):
    def __call__(self, rank: int, world_size: int, init_method: str, config_json: str) -> WorkerHandle: ...


_EXIT_GRACE_S = 5.0  # a rank told to stop exits in well under a second


class LocalProcess:
    def __init__(self, process: Any) -> None:
        self.process = process

    def is_alive(self) -> bool:
        return bool(self.process.is_alive())

    def stop(self) -> None:
        # NOTE: after rank 0's stop broadcast the rank leaves on its own, and its exit releases what
        # multiprocessing registered for it (a terminated rank left a "leaked semaphore" warning).
        self.process.join(timeout=_EXIT_GRACE_S)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=10)


def stop_ranks(tp: TPGroup, workers: list[WorkerHandle]) -> None:
    """Rank 0: ends every rank's step loop (`ModelRunner.serve_forever` stops at a None step) when
    all still run, stops the ranks and leaves the group."""
    if workers and all(w.is_alive() for w in workers):
        tp.broadcast(None)
    for worker in workers:
        worker.stop()
    workers.clear()
    tp.close()


def launch_local(rank: int, world_size: int, init_method: str, config_json: str) -> WorkerHandle:
    """Offline use: each rank > 0 is a local process (spawned, so no forked torch state)."""
    ctx = torch.multiprocessing.get_context("spawn")
    process = ctx.Process(target=run_worker, args=(rank, world_size, init_method, config_json), daemon=True)
    process.start()
    return LocalProcess(process)


def run_worker(rank: int, world_size: int, init_method: str, config_json: str) -> None:
    """Entry point of a rank > 0: load this rank's shard, then run every step rank 0 announces."""
    config = EngineConfig.model_validate_json(config_json)
    runner = build_worker_runner(config, rank, world_size, init_method)
    runner.serve_forever()
