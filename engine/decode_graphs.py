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
import time
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
    mask: torch.Tensor  # [B, 1, 1, L] for SDPA
    first: torch.Tensor  # [B] first visible position, for kernels that read the cache in place

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.input_ids, self.positions, self.slot_mapping, self.context_slots, self.mask, self.first

    def meta(self) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping,
            num_decode=self.input_ids.shape[0],
            decode_slots=self.context_slots,
            decode_mask=self.mask,
            prefills=[],
            decode_first=self.first,
            decode_last=self.positions,
        )


@dataclass
class _Bucket:
    inputs: DecodeInputs  # static buffers the graph reads
    graph: torch.cuda.CUDAGraph | None = None
    hidden: torch.Tensor | None = None  # [B, D] static output of the captured step
    routed: torch.Tensor | None = None  # [L, B, k]


class DecodeGraphs:
    """Static buffers and (on CUDA) one captured graph per bucket.

    NOTE: the runner captures every bucket at start-up (`capture_all`), right after the KV cache is
    allocated, so no request meets a capture (a warm-up, a capture, maybe a Triton compile) and the
    graph pool's memory is taken before serving starts. A bucket missed there is captured on first use.
    """

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

    def capture_all(self, padding_batch: Callable[[int, int], DecodeInputs]) -> None:
        """Captures every (batch, context) bucket from an all-padding batch of its shape."""
        t0 = time.perf_counter()
        for batch in self.batch_sizes:
            for length in self.context_lengths:
                if (batch, length) not in self._buckets:
                    self._buckets[batch, length] = self._new_bucket(padding_batch(batch, length))
        log.info("captured %d decode graphs (batches %s, contexts %s) in %.1fs", self.captured,
                 self.batch_sizes, self.context_lengths, time.perf_counter() - t0)

    def run(self, padded: DecodeInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [B, D] and routed [L, B, k] for a batch padded to one of `bucket`'s shapes."""
        key = (padded.input_ids.shape[0], padded.context_slots.shape[1])
        state = self._buckets.get(key)
        if state is None:
            state = self._buckets[key] = self._new_bucket(padded)
        static = state.inputs
        for dst, src in zip(static.tensors(), padded.tensors()):
            dst.copy_(src, non_blocking=True)
        if state.graph is None:
            return self.forward(static.input_ids, static.positions, static.meta())
        state.graph.replay()
        assert state.hidden is not None and state.routed is not None
        return state.hidden, state.routed

    def _new_bucket(self, example: DecodeInputs) -> _Bucket:
        # The example is a valid padded batch; its copy is the buffers' first content, so the
        # warm-up and capture runs below read real slots and write K/V the next replay rewrites.
        inputs = DecodeInputs(*(t.to(self.device, copy=True) for t in example.tensors()))
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
        log.debug("captured a decode graph for batch %d, context %d", *inputs.context_slots.shape)
        return state
