"""Tensor parallelism: the process group and the sharding rules (ranks are started by engine/ranks.py).

Megatron-style, as a small local transformation of the model: attention heads and every
expert's intermediate dimension are split across ranks, everything else is replicated, and
one all-reduce follows attention and one follows the MoE block. Rank 0 schedules and
samples; per step only the batch description is broadcast to the other ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from engine.model_config import ModelConfig
from engine.shm_channel import ShmChannel

@dataclass
class TPGroup:
    """This process's place in the tensor-parallel group (world_size 1: no communication).

    `channel`: shared memory for ranks on one CPU host (engine/shm_channel.py), which carries
    what fits it; gloo or NCCL carries the rest.
    """

    rank: int = 0
    world_size: int = 1
    group: Any = field(default=None, repr=False)
    channel: ShmChannel | None = field(default=None, repr=False)
    # This rank's device: every collective's tensors live here (NCCL has no CPU tensors).
    device: torch.device = torch.device("cpu")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1 and not (self.channel is not None and self.channel.all_reduce(x)):
            dist.all_reduce(x, group=self.group)
        return x

    def min(self, value: int) -> int:
        """The smallest of every rank's `value` (e.g. KV blocks that fit on every rank)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0 sends `obj`; every rank returns it."""
        if self.world_size == 1:
            return obj
        if self.channel is not None:
            return self.channel.broadcast(obj, self._broadcast_gloo)
        return self._broadcast_gloo(obj)

    def _broadcast_gloo(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


def rank_device(device: str, rank: int, own_devices: bool) -> torch.device:
    """The device of tensor-parallel `rank` for an engine configured with `device`.

    Ranks that see only their own GPU (`own_devices`: Ray sets each actor's CUDA_VISIBLE_DEVICES)
    all use the configured device; local ranks share the host's GPUs, so rank r takes the r-th
    GPU after the configured one (`cuda` = `cuda:0`). CPUs are shared by every rank.
    """
    d = torch.device(device)
    if d.type != "cuda" or own_devices:
        return d
    return torch.device("cuda", (d.index or 0) + rank)


def init_group(rank: int, world_size: int, init_method: str, device: torch.device) -> TPGroup:
    """Joins the group (world_size > 1) on `device`, this rank's (see `rank_device`)."""
    if device.type == "cuda":
        if (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"tensor-parallel rank {rank} needs {device} but {torch.cuda.device_count()} "
                             "GPU(s) are visible")
        torch.cuda.set_device(device)  # NCCL and every later allocation use this rank's GPU
    if world_size == 1:
        return TPGroup(device=device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
    channel = ShmChannel.open(rank, world_size, dist.group.WORLD) if device.type == "cpu" else None
    return TPGroup(rank, world_size, dist.group.WORLD, channel, device)


def check_tp_size(cfg: ModelConfig, tp: int) -> None:
    """The split must give every rank whole heads, whole KV-head groups and equal expert slices."""
    h, kv, inter = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    if h % tp:
        raise ValueError(f"tensor_parallel_size {tp} does not divide the {h} attention heads")
    if kv % tp and tp % kv:
        raise ValueError(f"tensor_parallel_size {tp} and the {kv} KV heads must divide one another")
    if inter % tp:
        raise ValueError(f"tensor_parallel_size {tp} does not divide the intermediate size {inter}")


@dataclass(frozen=True)
class LocalShape:
    """What one rank holds."""

    n_heads: int
    n_kv_heads: int
    intermediate: int
    kv_head_offset: int  # first KV head this rank holds
    rank: int
    world_size: int

    @classmethod
    def of(cls, cfg: ModelConfig, tp: TPGroup) -> "LocalShape":
        w = tp.world_size
        n_kv = max(cfg.num_key_value_heads // w, 1)
        # With fewer KV heads than ranks, each rank keeps the one KV head its query heads use.
        kv_offset = tp.rank * cfg.num_key_value_heads // w
        return cls(cfg.num_attention_heads // w, n_kv, cfg.intermediate_size // w, kv_offset, tp.rank, w)

    def shard(self, hf_name: str, cfg: ModelConfig) -> tuple[int, int, int] | None:
        """(dim, start, stop) of this rank's slice of a Hugging Face tensor; None = replicated."""
        if self.world_size == 1:
            return None
        hd, r = cfg.head_dim, self.rank
        if hf_name.endswith("q_proj.weight"):
            return 0, r * self.n_heads * hd, (r + 1) * self.n_heads * hd
        if hf_name.endswith(("k_proj.weight", "v_proj.weight")):
            return 0, self.kv_head_offset * hd, (self.kv_head_offset + self.n_kv_heads) * hd
        if hf_name.endswith("o_proj.weight"):
            return 1, r * self.n_heads * hd, (r + 1) * self.n_heads * hd
        if hf_name.endswith(("w1.weight", "w3.weight")):
            return 0, r * self.intermediate, (r + 1) * self.intermediate
        if hf_name.endswith("w2.weight"):
            return 1, r * self.intermediate, (r + 1) * self.intermediate
        return None
