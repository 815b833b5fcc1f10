"""Decode steps padded to fixed (batch, context) buckets and replayed from captured CUDA graphs.

A decode step launches a few kernels per layer, each too short to hide its launch cost on a GPU;
a captured graph launches the whole step at once. A graph fixes every shape and address, so each
bucket owns static input buffers: the runner pads a step's decode batch up to the bucket's batch
and its context up to the bucket's length, copies it in, and replays.

NOTE: padding rows write their K/V into a scratch block that the block manager never hands out
(the runner allocates one block more than it reports) and attend only to that block's first
slot, so they never touch a sequence's cache and never produce NaNs. On a CPU there is nothing
to capture: the same padded static path runs eagerly, which is how its padding logic is tested.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.attention import AttentionMetadata
from engine.config import DecodeGraphConfig

log = logging.getLogger(__name__)

# forward(input_ids [B], positions [B], meta) -> (hidden [B, D], routed [L, B, k])
DecodeForward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], tuple[torch.Tensor, torch.Tensor]]


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to and including `max_batch`."""
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return [*sizes, max_batch] if max_batch else []


def context_buckets(max_context: int, block_size: int) -> list[int]:
    """Context lengths in whole blocks: 256 tokens (at least one block) doubling up to `max_context`."""
    top = -(-max_context // block_size) * block_size
    length = min(top, max(block_size, -(-256 // block_size) * block_size))
    lengths: list[int] = []
    while length < top:
        lengths.append(length)
        length *= 2
    return [*lengths, top]


@dataclass
class DecodeInputs:
    """One step's decode batch, padded to a bucket (host or device tensors)."""

    input_ids: torch.Tensor  # [B]
    positions: torch.Tensor  # [B]
    slot_mapping: torch.Tensor  # [B]
    context_slots: torch.Tensor  # [B, L]
    mask: torch.Tensor  # [B, 1, 1, L]

    def meta(self) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping,
            num_decode=self.input_ids.shape[0],
            decode_slots=self.context_slots,
            decode_mask=self.mask,
            prefills=[],
        )


@dataclass
class _Bucket:
    inputs: DecodeInputs  # static buffers the graph reads
    graph: torch.cuda.CUDAGraph | None = None
    hidden: torch.Tensor | None = None  # [B, D] static output of the captured step
    routed: torch.Tensor | None = None  # [L, B, k]


class DecodeGraphs:
    """Static buffers and (on CUDA) one captured graph per bucket, captured on first use."""

    def __init__(self, config: DecodeGraphConfig, forward: DecodeForward, block_size: int, device: torch.device) -> None:
        self.forward = forward
        self.device = device
        self.batch_sizes = batch_buckets(config.max_batch)
        self.context_lengths = context_buckets(config.max_context, block_size)
        self.capture = device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self._buckets: dict[tuple[int, int], _Bucket] = {}

    def bucket(self, batch: int, context: int) -> tuple[int, int] | None:
        """The smallest (batch, context length) bucket holding this step, or None (run it eagerly)."""
        b = next((s for s in self.batch_sizes if s >= batch), None)
        length = next((c for c in self.context_lengths if c >= context), None)
        return None if b is None or length is None else (b, length)

    @property
    def captured(self) -> int:
        return sum(1 for b in self._buckets.values() if b.graph is not None)

    def run(self, padded: DecodeInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [B, D] and routed [L, B, k] for a batch padded to one of `bucket`'s shapes."""
        key = (padded.input_ids.shape[0], padded.context_slots.shape[1])
        state = self._buckets.get(key)
        if state is None:
            state = self._buckets[key] = self._new_bucket(padded)
        static = state.inputs
        for dst, src in zip(
            (static.input_ids, static.positions, static.slot_mapping, static.context_slots, static.mask),
            (padded.input_ids, padded.positions, padded.slot_mapping, padded.context_slots, padded.mask),
        ):
            dst.copy_(src, non_blocking=True)
        if state.graph is None:
            return self.forward(static.input_ids, static.positions, static.meta())
        state.graph.replay()
        assert state.hidden is not None and state.routed is not None
        return state.hidden, state.routed

    def _new_bucket(self, example: DecodeInputs) -> _Bucket:
        # The example is a valid padded batch; its copy is the buffers' first content, so the
        # warm-up and capture runs below read real slots and write K/V the next replay rewrites.
        inputs = DecodeInputs(
            *(t.to(self.device, copy=True) for t in (
                example.input_ids, example.positions, example.slot_mapping, example.context_slots, example.mask
            ))
        )
        state = _Bucket(inputs)
        if not self.capture:
            return state
        # NOTE: one warm-up run on a side stream first: Triton compiles and cuBLAS allocates its
        # workspace there, since neither may happen inside a capture.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self.forward(inputs.input_ids, inputs.positions, inputs.meta())
        torch.cuda.current_stream(self.device).wait_stream(side)
        state.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(state.graph, pool=self.pool):
            state.hidden, state.routed = self.forward(inputs.input_ids, inputs.positions, inputs.meta())
        log.info("captured a decode graph for batch %d, context %d", *inputs.context_slots.shape)
        return state
