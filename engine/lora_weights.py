"""Adapter slots on the device and one step's view of them.

Each layer holds stacked weights for `max_loras` slots at `max_lora_rank` (smaller ranks are zero
padded, which adds nothing): attention `qkv` (q, k, v side by side) and `o` per slot, the experts'
`w13` (w1, w3 side by side) and `w2` per slot x expert; each stack ends with one group of zeros
that rows without an adapter read (engine/lora_ops.py). Under tensor parallelism each rank holds
its slice, cut as the base weight is: B's rows where the base weight's rows are split (q, k, v,
w1, w3), A's columns where its inputs are (o, w2), so the partial products sum in the same
all-reduce as the base ones.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from engine import cpu_kernels
from engine.lora_adapter import LoRAAdapter, read_adapter
from engine.lora_ops import Groups, add_lora
from engine.lora_request import LoRARequest
from engine.model_config import ModelConfig
from engine.parallel import LocalShape

_SITES = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o", "w1": "w13", "w3": "w13", "w2": "w2"}
_POSITION = {"q_proj": 0, "k_proj": 1, "v_proj": 2, "o_proj": 0, "w1": 0, "w3": 1, "w2": 0}  # column block of A


@dataclass
class LayerStacks:
    qkv_a: torch.Tensor  # [S + 1, 3R, D]
    qkv_b: torch.Tensor  # [S + 1, R, QKV_local] (B transposed)
    o_a: torch.Tensor  # [S + 1, R, H_local hd]
    o_b: torch.Tensor  # [S + 1, R, D]
    w13_a: torch.Tensor  # [S E + 1, 2R, D]
    w13_b: torch.Tensor  # [S E + 1, R, 2 I_local]
    w2_a: torch.Tensor  # [S E + 1, R, I_local]
    w2_b: torch.Tensor  # [S E + 1, R, D]


class AdapterCache:
    """Adapters read from disk, kept in host memory (least recently used dropped first)."""

    def __init__(self, cfg: ModelConfig, max_rank: int, capacity: int) -> None:
        self.cfg, self.max_rank, self.capacity = cfg, max_rank, capacity
        self._adapters: OrderedDict[str, LoRAAdapter] = OrderedDict()
        self.reads_total = 0
        self.read_seconds_total = 0.0

    def holds(self, request: LoRARequest) -> bool:
        return request.key in self._adapters

    def read(self, request: LoRARequest) -> LoRAAdapter:
        """Reads the adapter from disk (any thread; nothing cached); AdapterError names what is wrong."""
        start = time.perf_counter()
        adapter = read_adapter(Path(request.path), self.cfg, self.max_rank)
        self.reads_total += 1
        self.read_seconds_total += time.perf_counter() - start
        return adapter

    def put(self, request: LoRARequest, adapter: LoRAAdapter) -> None:
        self._adapters[request.key] = adapter
        self._adapters.move_to_end(request.key)
        while len(self._adapters) > self.capacity:
            self._adapters.popitem(last=False)

    def get(self, request: LoRARequest) -> LoRAAdapter:
        """The adapter, read on first use; raises AdapterError naming what is wrong with it."""
        adapter = self._adapters.get(request.key)
        if adapter is None:
            adapter = self.read(request)
        self.put(request, adapter)
        return adapter

    def drop(self, request: LoRARequest) -> None:
        self._adapters.pop(request.key, None)


class LoRAWeights:
    def __init__(self, cfg: ModelConfig, local: LocalShape, slots: int, rank: int, dtype: torch.dtype,
                 device: torch.device, isa: cpu_kernels.Isa | None = None) -> None:
        self.cfg, self.local, self.num_slots, self.rank = cfg, local, slots, rank
        self.kernel = None if isa is None else cpu_kernels.LoRAKernel(isa)  # where the CPU kernels run
        e, d, hd, r = cfg.num_local_experts, cfg.hidden_size, cfg.head_dim, rank
        q_rows, kv_rows, inter = local.n_heads * hd, local.n_kv_heads * hd, local.intermediate
        self.splits = {"qkv": (q_rows, kv_rows, kv_rows), "o": (d,), "w13": (inter, inter), "w2": (d,)}

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        n, ne = slots + 1, slots * e + 1  # with the null group
        self.layers = [
            LayerStacks(
                zeros(n, 3 * r, d), zeros(n, r, q_rows + 2 * kv_rows), zeros(n, r, q_rows), zeros(n, r, d),
                zeros(ne, 2 * r, d), zeros(ne, r, 2 * inter), zeros(ne, r, inter), zeros(ne, r, d),
            )
            for _ in range(cfg.num_hidden_layers)
        ]
        # Which sites each slot's adapter has: steps skip the others.
        self.sites: list[set[str]] = [set() for _ in range(slots)]

    def _local(self, layer: int, target: str, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of one module's A [r, in] and B [out, r]."""
        shard = self.local.shard(f"model.layers.{layer}.x.{target}.weight", self.cfg)
        if shard is None:
            return a, b
        dim, start, stop = shard
        return (a, b[start:stop]) if dim == 0 else (a[:, start:stop], b)

    def load(self, slot: int, adapter: LoRAAdapter) -> None:
        """Writes `adapter` into `slot` (whatever held it before is overwritten)."""
        e, r = self.cfg.num_local_experts, self.rank
        for stacks in self.layers:
            for name, tensor in vars(stacks).items():
                groups = slice(slot * e, (slot + 1) * e) if name.startswith("w") else slice(slot, slot + 1)
                tensor[groups].zero_()
        self.sites[slot] = set()
        for (layer, target, expert), (a, b) in adapter.weights.items():
            a, b = self._local(layer, target, a, b)
            site, pos, rank = _SITES[target], _POSITION[target], a.shape[0]
            stacks = self.layers[layer]
            group = slot if expert is None else slot * e + expert
            stack_a, stack_b = getattr(stacks, f"{site}_a"), getattr(stacks, f"{site}_b")
            rows = sum(self.splits[site][:pos])
            stack_a[group, pos * r : pos * r + rank] = a
            stack_b[group, :rank, rows : rows + b.shape[0]] = b.t()
            self.sites[slot].add(site)

    def step(self, token_slots: list[int], device: torch.device) -> StepLoRA | None:
        """This step's view, for rows running slots `token_slots` (-1: none); None when no row has one."""
        if all(s < 0 for s in token_slots):
            return None
        return StepLoRA(self, token_slots, device)


class StepLoRA:
    """One step's adapters: which slot each row runs, applied layer by layer and site by site."""

    def __init__(self, weights: LoRAWeights, token_slots: list[int], device: torch.device) -> None:
        self.weights = weights
        self.layer = 0  # the layer being run (set by the model)

        def groups(site: str) -> Groups | None:
            index = [s if s >= 0 and site in weights.sites[s] else -1 for s in token_slots]
            return Groups(torch.tensor(index, device=device)) if any(i >= 0 for i in index) else None

        self.qkv, self.o = groups("qkv"), groups("o")
        slots = torch.tensor(token_slots, device=device)  # [T]
        has_experts = [bool({"w13", "w2"} & weights.sites[s]) for s in range(weights.num_slots)] + [False]
        # Slot -1 indexes the extra False: rows without an adapter skip the experts' LoRA.
        self._expert_rows = torch.tensor(has_experts, device=device)[slots]  # [T] bool
        self._slots = slots
        self.experts_on = any(s >= 0 and has_experts[s] for s in token_slots)

    @property
    def stacks(self) -> LayerStacks:
        return self.weights.layers[self.layer]

    def add_qkv(self, out: torch.Tensor, x: torch.Tensor) -> None:
        if self.qkv is not None:
            add_lora(out, x, self.qkv, self.stacks.qkv_a, self.stacks.qkv_b, self.weights.splits["qkv"],
                     self.weights.kernel)

    def add_o(self, out: torch.Tensor, x: torch.Tensor) -> None:
        if self.o is not None:
            add_lora(out, x, self.o, self.stacks.o_a, self.stacks.o_b, self.weights.splits["o"], self.weights.kernel)

    def experts(self, ids: torch.Tensor) -> ExpertLoRA | None:
        """The experts' LoRA for this layer's routing `ids` [T, k]; None when no row has one."""
        if not self.experts_on:
            return None
        e = self.weights.cfg.num_local_experts
        pairs = torch.where(self._expert_rows[:, None], self._slots[:, None] * e + ids, -1)  # [T, k]
        return ExpertLoRA(self.stacks, pairs.reshape(-1), self.weights)


class ExpertLoRA:
    """LoRA on w1/w3 (before the activation) and w2 for rows that are (token, choice) pairs."""

    def __init__(self, stacks: LayerStacks, pairs: torch.Tensor, weights: LoRAWeights) -> None:
        self.stacks, self.splits, self.kernel = stacks, weights.splits, weights.kernel
        self.pairs = pairs  # [T*k] slot x expert group of each pair, -1 none, (token, choice) order

    def groups(self, order: torch.Tensor | None = None) -> Groups:
        """Groups of rows in pair order, or in `order` (rows sorted some other way: [T*k] pair indices)."""
        return Groups(self.pairs if order is None else self.pairs[order])

    def add13(self, h: torch.Tensor, xs: torch.Tensor, groups: Groups) -> None:
        """h [R, 2I] += LoRA of w1 | w3 for rows xs [R, D]."""
        add_lora(h, xs, groups, self.stacks.w13_a, self.stacks.w13_b, self.splits["w13"], self.kernel)

    def add2(self, y: torch.Tensor, act: torch.Tensor, groups: Groups) -> None:
        """y [R, D] += LoRA of w2 for activations act [R, I]."""
        add_lora(y, act, groups, self.stacks.w2_a, self.stacks.w2_b, self.splits["w2"], self.kernel)
