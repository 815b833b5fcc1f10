"""A model replica's metrics: request latencies from its streams, engine statistics once a second.

Recording stays off the engine's step thread and off the per-token path: a stream only notes
timestamps (a clock read and a list append per engine output), and a task on the replica's
event loop turns those notes and the deltas of `engine.stats()` into Ray metric calls every
`interval` seconds.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import aclosing
from typing import Any

from deployments import metrics as m
from engine.outputs import EngineStats, RequestError, RequestOutput

log = logging.getLogger("ray.serve")

# Engine counters exported as deltas of the cumulative `EngineStats` fields.
_COUNTERS: tuple[tuple[m.MetricSpec, str], ...] = (
    (m.PROMPT_TOKENS, "prompt_tokens_total"),
    (m.GENERATION_TOKENS, "generation_tokens_total"),
    (m.PREFIX_QUERIES, "prefix_cache_queries"),
    (m.PREFIX_HITS, "prefix_cache_hits"),
    (m.PREEMPTIONS, "num_preemptions"),
    (m.STEPS, "steps_total"),
    (m.LORA_SLOT_LOADS, "lora_slot_loads_total"),
    (m.LORA_READS, "lora_reads_total"),
    (m.LORA_READ_TIME, "lora_read_seconds_total"),
)
_GAUGES: tuple[tuple[m.MetricSpec, Callable[[EngineStats], float]], ...] = (
    (m.RUNNING, lambda s: s.num_running),
    (m.WAITING, lambda s: s.num_waiting),
    (m.KV_USAGE, lambda s: s.kv_usage),
    (m.STEP_TIME, lambda s: s.last_step_seconds),
    (m.BATCH_SIZE, lambda s: s.last_batch_seqs),
    (m.BATCH_TOKENS, lambda s: s.last_batch_tokens),
    (m.LORA_RESIDENT, lambda s: s.lora_resident),
)
_HISTOGRAMS = (m.TTFT, m.ITL, m.E2E, m.QUEUE_TIME, m.REQUEST_PROMPT_TOKENS, m.REQUEST_GENERATION_TOKENS)
_CALLS_PER_SLICE = 64


class ReplicaMetrics:
    """Create inside the replica, on its running event loop: the flush task starts at once and
    lives as long as the loop (the replica's process)."""

    def __init__(self, tier: str, stats: Callable[[], EngineStats], buckets: Mapping[str, Sequence[float]],
                 interval: float = 1.0) -> None:
        tags = {"tier": tier}
        self._stats = stats
        self._interval = interval
        self._histograms = {spec: m.create(spec, tags, buckets.get(spec.name)) for spec in _HISTOGRAMS}
        self._counters = {spec: m.create(spec, tags) for spec, _ in _COUNTERS}
        self._gauges = {spec: m.create(spec, tags) for spec, _ in _GAUGES}
        self._success = m.create(m.REQUEST_SUCCESS, tags)
        self._experts = m.create(m.EXPERT_TOKENS, tags)
        self._adapter_requests = m.create(m.LORA_REQUESTS, tags)
        self._adapter_tokens = m.create(m.LORA_GENERATION_TOKENS, tags)
        # What the streams noted since the last flush.
        self._pending: dict[m.MetricSpec, list[float]] = {spec: [] for spec in _HISTOGRAMS}
        self._finished: collections.Counter[str] = collections.Counter()
        self._by_adapter: dict[str, list[int]] = {}  # adapter -> [requests, generated tokens]
        self._last = stats()
        # Held: the event loop keeps only a weak reference to its tasks.
        self._task = asyncio.get_running_loop().create_task(self._run(), name="replica-metrics")

    # ---- the streams' side ------------------------------------------------------------------
    def track(self, batches: AsyncIterator[list[RequestOutput]], num_choices: int,
              adapter: str | None = None) -> AsyncIterator[list[RequestOutput]]:
        """Passes a request's engine outputs through (as the engine hands them over: each read's
        outputs in one list), noting its latencies (and its tokens under its LoRA `adapter`);
        closing it closes `batches` (the engine then aborts an unfinished request). Call when the
        request arrives."""
        return self._track(batches, num_choices, time.monotonic(), adapter)

    async def _track(self, batches: AsyncIterator[list[RequestOutput]], num_choices: int,
                     arrival: float, adapter: str | None) -> AsyncIterator[list[RequestOutput]]:
        pending = self._pending
        last: float | None = None
        unfinished = num_choices
        failed = True
        generated = 0
        try:
            async with aclosing(batches):
                async for batch in batches:
                    for out in batch:
                        # NOTE: when the engine made each step's tokens, not when they arrived here: a
                        # stream's steps are handed over several at a time (its flush interval).
                        times = out.step_times
                        if last is None:
                            pending[m.TTFT].append(times[0] - arrival)
                            if out.queue_time is not None:
                                pending[m.QUEUE_TIME].append(out.queue_time)
                        else:
                            pending[m.ITL].append(times[0] - last)
                        pending[m.ITL].extend(b - a for a, b in itertools.pairwise(times))
                        last = times[-1]
                        for choice in out.choices:
                            if choice.finish_reason is not None:
                                self._finished[choice.finish_reason] += 1
                                unfinished -= 1
                        generated = out.num_output_tokens
                        if out.finished:
                            pending[m.E2E].append(last - arrival)
                            pending[m.REQUEST_PROMPT_TOKENS].append(out.num_prompt_tokens)
                            pending[m.REQUEST_GENERATION_TOKENS].append(out.num_output_tokens)
                    yield batch
            failed = False
        except RequestError:
            unfinished = 0  # refused before admission: a rejection (the router counts it), not a finish
            raise
        except (GeneratorExit, asyncio.CancelledError):
            failed = False  # the consumer stopped reading: an abort, counted below
            raise
        finally:
            if unfinished > 0:
                self._finished["error" if failed else "abort"] += unfinished
            if adapter is not None:
                counts = self._by_adapter.setdefault(adapter, [0, 0])
                counts[0] += 1
                counts[1] += generated

    # ---- the flush task ---------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.flush()
            except Exception:  # noqa: BLE001 - metrics must never take the replica down
                log.exception("recording metrics failed")

    async def flush(self) -> None:
        """Records what the streams noted and the engine's statistics since the last call.

        NOTE: it yields to the event loop every `_CALLS_PER_SLICE` Ray calls (about 5 us each): the
        engine's next step is dispatched from this loop, and a busy second's hundreds of
        observations recorded in one go would hold that step back by milliseconds.
        """
        for spec, values in self._pending.items():
            if values:
                self._pending[spec] = []
                observe = self._histograms[spec].observe
                for start in range(0, len(values), _CALLS_PER_SLICE):
                    for value in values[start:start + _CALLS_PER_SLICE]:
                        observe(value)
                    await asyncio.sleep(0)
        finished, self._finished = self._finished, collections.Counter()
        for reason, count in finished.items():
            self._success.inc(count, tags={"finished_reason": reason})
        by_adapter, self._by_adapter = self._by_adapter, {}
        for adapter, (requests, tokens) in by_adapter.items():
            _inc(self._adapter_requests, requests, {"adapter": adapter})
            _inc(self._adapter_tokens, tokens, {"adapter": adapter})

        stats, last = self._stats(), self._last
        self._last = stats
        for spec, read in _GAUGES:
            self._gauges[spec].set(read(stats))
        for spec, field in _COUNTERS:
            _inc(self._counters[spec], getattr(stats, field) - getattr(last, field))
        for layer, (now_row, last_row) in enumerate(zip(stats.expert_tokens, last.expert_tokens)):
            for expert, (now_count, last_count) in enumerate(zip(now_row, last_row)):
                _inc(self._experts, now_count - last_count, {"layer": str(layer), "expert": str(expert)})
            await asyncio.sleep(0)


def _inc(counter: Any, delta: float, tags: dict[str, str] | None = None) -> None:
    # Ray refuses increments <= 0; a counter appears in Prometheus with its first increment.
    if delta > 0:
        counter.inc(delta, tags=tags)
