"""Tensor-parallel ranks > 0 as Ray actors in the replica's placement group.

The replica process is rank 0 (in the group's first bundle); rank r runs in bundle r. The ranks
meet at the replica's node address (gloo on CPU, NCCL on GPUs), so a SPREAD placement that puts
them on other nodes works too. The engine only sees `engine.ranks.WorkerHandle`.
"""

from __future__ import annotations

import ray
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from engine.ranks import WorkerHandle, run_worker


@ray.remote
class _RankActor:
    def run(self, rank: int, world_size: int, init_method: str, config_json: str) -> None:
        run_worker(rank, world_size, init_method, config_json)  # returns when rank 0 stops the group


class RayRank:
    def __init__(self, actor: ray.actor.ActorHandle, done: ray.ObjectRef) -> None:
        self.actor = actor
        self.done = done  # resolves when the rank's loop ends (or its process dies)

    def is_alive(self) -> bool:
        finished, _ = ray.wait([self.done], timeout=0)
        return not finished

    def stop(self) -> None:
        ray.kill(self.actor)


class RayRankLauncher:
    """Starts rank r in bundle r of the current placement group with that bundle's resources."""

    def __init__(self, num_cpus: float, num_gpus: float) -> None:
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus

    def __call__(self, rank: int, world_size: int, init_method: str, config_json: str) -> WorkerHandle:
        group = get_current_placement_group()
        if group is None:
            raise RuntimeError("tensor parallelism under Ray needs the replica's placement group")
        actor = _RankActor.options(
            num_cpus=self.num_cpus,
            num_gpus=self.num_gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank),
        ).remote()
        return RayRank(actor, actor.run.remote(rank, world_size, init_method, config_json))
