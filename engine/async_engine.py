"""Async front of the engine: many concurrent generators share one engine core.

NOTE: the core (engine/engine_core.py) steps back to back while there is work, in its own
process or on a thread, so the event loop (a Ray Serve replica's, or any asyncio server's)
keeps answering while the model computes and never paces the engine. A step's outputs come back
to the event loop in one hand-off, whatever the number of streams, and only once some stream's
flush interval is up (the core holds them till then); a stream whose reader fell behind finds
every output that arrived meanwhile in one read (`stream()`), so a slow consumer costs one
wake-up per read, not one per step. Prompts are encoded and checked here, before they reach the
core.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from engine.config import EngineConfig, SchedulerConfig
from engine.engine_core import (
    AddRequest,
    ProcessCore,
    StepReport,
    ThreadCore,
)
from engine.lora_adapter import AdapterError, check_adapter
from engine.lora_request import LoRARequest
from engine.outputs import (
    EngineDeadError,
    EngineStats,
    RequestError,
    RequestFailedError,
    RequestOutput,
)
from engine.ranks import RankPlacement, WorkerLauncher, launch_local
from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    """One request's outputs, appended on the event loop, taken by its reader in one go."""

    items: list[RequestOutput | BaseException] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def put(self, item: RequestOutput | BaseException) -> None:
        self.items.append(item)
        self.ready.set()

    async def take(self) -> list[RequestOutput | BaseException]:
        await self.ready.wait()
        self.ready.clear()
        items, self.items = self.items, []
        return items


class AsyncEngine:
    def __init__(self, config: EngineConfig, launcher: WorkerLauncher = launch_local,
                 placement: RankPlacement = RankPlacement()) -> None:
        """`launcher`/`placement`: where tensor-parallel ranks > 0 start. A caller's own launcher
        (Ray actors) keeps the core on a thread here, whatever `config.core_process` says."""
        own_ranks = config.tensor_parallel_size > 1 and launcher is not launch_local
        self.core: ThreadCore | ProcessCore = (
            ProcessCore(config) if config.core_process and not own_ranks else ThreadCore(config, launcher, placement))
        self.tokenizer = self.core.tokenizer
        self._limits = self.core.info.limits
        self.cpu_threads = self.core.info.cpu_threads
        self.model_config, self._lora = self.core.info.model_config, self.core.info.lora
        self._tuning = self.core.info.tuning
        # NOTE: stats() serves the snapshot the core takes after each step: reading a live
        # engine from the event loop would race the step and could mix fields from before and
        # after it (a sequence counted both waiting and running, say).
        self._stats = self.core.info.stats
        self._latency_fit: dict[str, float] | None = None
        self.last_step_end = time.monotonic()  # the health probe checks the loop keeps moving
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started: asyncio.Future[None] | None = None  # the core's start, awaited by every caller
        self._streams: dict[str, _Stream] = {}
        self._dead: BaseException | None = None

    # ---- public API ----------------------------------------------------------------------
    @property
    def engine(self) -> LLMEngine:
        """The engine object itself, where the core runs on a thread here (tests reach into it)."""
        assert isinstance(self.core, ThreadCore), "the engine core runs in another process"
        return self.core.engine

    @property
    def is_running(self) -> bool:
        return self._loop is not None and self._dead is None and self.core.alive()

    async def start(self) -> None:
        """Starts the core's step loop, delivering to the running event loop (idempotent)."""
        if self._dead is not None:
            raise EngineDeadError(f"engine loop died: {self._dead!r}")
        if self._started is None:
            self._loop = loop = asyncio.get_running_loop()
            self._started = asyncio.ensure_future(self.core.start(loop, self._deliver, self._die))
        await asyncio.shield(self._started)  # a caller cancelled meanwhile must not cancel it for the others

    async def stream(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        priority: int = 0,
        continuation: bool = True,
        lora: LoRARequest | None = None,
        whole: bool = False,
    ) -> AsyncIterator[list[RequestOutput]]:
        """Yields every `RequestOutput` that arrived since the previous read, in order, the last with
        `finished`. The first (one step's tokens) arrives at once, later ones every `stream_flush_ms`,
        each the steps held meanwhile merged into one (engine/output_hold.py); `whole`: everything
        in one output at the end.

        Leaving the loop early (client gone, task cancelled) aborts the request.
        Raises `RequestError` before any work when the request can never complete.
        """
        await self.start()
        prompt_ids = self.tokenizer.encode(prompt, add_bos=True) if isinstance(prompt, str) else list(prompt)
        self.validate(prompt_ids, params)
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = _Stream()
        self._streams[request_id] = stream
        self.core.send(AddRequest(request_id, prompt_ids, params, priority, continuation, lora, whole))
        finished = False
        try:
            while not finished:
                outputs: list[RequestOutput] = []
                error: BaseException | None = None
                for item in await stream.take():
                    if isinstance(item, BaseException):
                        error = item
                    elif item.error is not None:
                        error = RequestFailedError(item.error)
                    else:
                        outputs.append(item)
                        finished = item.finished
                        continue
                    break
                if outputs:  # what came before a failure in the same read is still the caller's
                    yield outputs
                if error is not None:
                    raise error
        finally:
            self._streams.pop(request_id, None)
            if not finished and self._dead is None:
                self.core.send(request_id)  # abort

    async def generate(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        priority: int = 0,
        continuation: bool = True,
        lora: LoRARequest | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """`stream()`, one `RequestOutput` at a time."""
        async for outputs in self.stream(request_id, prompt, params, priority, continuation, lora):
            for out in outputs:
                yield out

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raises `RequestError` for a request that could never complete (as `stream` would)."""
        self._limits.check(prompt_ids, params)

    def check_adapter(self, lora: LoRARequest) -> None:
        """Raises `RequestError` naming what keeps this engine from serving the adapter (its config and
        tensor headers are read, not its weights; the core reads those on first use)."""
        if not self._lora.max_loras:
            raise RequestError("LoRA adapters are off in this engine: set lora.max_loras above 0", param="model")
        try:
            check_adapter(lora.path, self.model_config, self._lora.max_lora_rank)
        except AdapterError as err:
            raise RequestError(f"adapter {lora.name!r}: {err}", param="lora_path") from None

    async def abort(self, request_id: str) -> None:
        self.core.send(request_id)

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Prompt ids of an assistant reply to `messages`, with `tools` to call (ChatTemplateError when malformed)."""
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools)

    @property
    def tuning(self) -> SchedulerConfig:
        """The scheduler knobs in force (a `reconfigure` shows here once the core applied it)."""
        return self._tuning

    def reconfigure(self, tuning: SchedulerConfig) -> None:
        """New scheduler knobs, applied between steps."""
        self.core.send(tuning)

    def latency_fit(self) -> dict[str, float] | None:
        """The fixed-latency controller's model, as of the core's last report (a fraction of a second)."""
        return self._latency_fit

    def stats(self) -> EngineStats:
        stats = self._stats
        if self._dead is not None:
            return replace(stats, healthy=False, error=repr(self._dead))
        return stats

    def check_health(self, stall_seconds: float) -> None:
        """Raises when the loop died, a tensor-parallel rank died or a step has been running for
        over `stall_seconds`."""
        if self._dead is not None:
            raise EngineDeadError(f"engine loop died: {self._dead!r}")
        # NOTE: ranks are checked here too, not only at the next step: a rank lost while the
        # replica is idle then gets it replaced before a request finds out.
        self.core.check_ranks()
        if not self.core.alive():
            raise EngineDeadError("engine loop is not running")
        busy = bool(self._streams) or self._stats.num_running + self._stats.num_waiting > 0
        if busy and time.monotonic() - self.last_step_end > stall_seconds:
            raise EngineDeadError(f"engine step loop stalled for over {stall_seconds:.0f}s")

    async def shutdown(self) -> None:
        """Stops the core; streams still open, and any later `generate`, get EngineDeadError."""
        await self.core.aclose()
        if self._dead is None:
            self._fail_all(EngineDeadError("the engine was shut down"))

    # ---- on the event loop ---------------------------------------------------------------
    def _deliver(self, report: StepReport) -> None:
        self._stats, self.last_step_end = report.stats, report.step_end
        if report.tuning is not None:
            self._tuning = report.tuning
        if report.has_fit:
            self._latency_fit = report.latency_fit
        for request_id, item in report.delivered:
            if (stream := self._streams.get(request_id)) is not None:
                stream.put(item)

    def _die(self, err: BaseException) -> None:
        self._fail_all(EngineDeadError(f"engine loop died: {err!r}"), err)

    def _fail_all(self, err: EngineDeadError, cause: BaseException | None = None) -> None:
        self._dead = self._dead or cause or err
        for stream in self._streams.values():
            stream.put(err)
