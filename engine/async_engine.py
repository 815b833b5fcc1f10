"""Async front of the engine: many concurrent generators share one background step loop.

NOTE: model steps run on one dedicated worker thread, so the event loop (a Ray Serve replica's,
or any asyncio server's) keeps answering while the model computes. Requests and aborts are
handed to that thread through a queue and applied between steps, so the engine's state is
only ever touched by one thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from engine.config import EngineConfig, SchedulerConfig
from engine.llm_engine import LLMEngine
from engine.ranks import RankPlacement, WorkerLauncher, launch_local
from engine.outputs import EngineDeadError, EngineStats, RequestFailedError, RequestOutput, StepFailedError
from engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    priority: int
    continuation: bool


class AsyncEngine:
    def __init__(self, config: EngineConfig, launcher: WorkerLauncher = launch_local,
                 placement: RankPlacement = RankPlacement()) -> None:
        self.engine = LLMEngine(config, launcher, placement)
        self.tokenizer = self.engine.tokenizer
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-step")
        self._commands: queue.SimpleQueue[_Add | str | SchedulerConfig] = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._dead: BaseException | None = None
        # NOTE: stats() serves the snapshot the step thread takes after each step: reading the
        # live engine from the event loop would race the step and could mix fields from before
        # and after it (a sequence counted both waiting and running, say).
        self._stats = self.engine.stats()
        self.last_step_end = time.monotonic()  # the health probe checks the loop keeps moving

    # ---- public API ----------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    def start(self) -> None:
        """Starts the step loop on the running event loop (idempotent)."""
        if self._dead is not None:
            raise EngineDeadError(f"engine loop died: {self._dead!r}")
        if self._loop_task is None:
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="engine-loop")

    async def generate(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        priority: int = 0,
        continuation: bool = True,
    ) -> AsyncIterator[RequestOutput]:
        """Yields one `RequestOutput` per step that produced tokens, the last with `finished`.

        Leaving the loop early (client gone, task cancelled) aborts the request.
        Raises `RequestError` before any work when the request can never complete.
        """
        self.start()
        prompt_ids = self.tokenizer.encode(prompt, add_bos=True) if isinstance(prompt, str) else list(prompt)
        self.engine.validate(prompt_ids, params)
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._streams[request_id] = stream
        self._send(_Add(request_id, prompt_ids, params, priority, continuation))
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                if item.error is not None:
                    raise RequestFailedError(item.error)
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._send(request_id)  # abort

    async def abort(self, request_id: str) -> None:
        self._send(request_id)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt ids of an assistant reply to `messages` (ChatTemplateError when malformed)."""
        return self.engine.encode_chat(messages)

    @property
    def tuning(self) -> SchedulerConfig:
        """The scheduler knobs in force (a `reconfigure` shows here once the step thread applied it)."""
        return self.engine.config.scheduler

    def reconfigure(self, tuning: SchedulerConfig) -> None:
        """New scheduler knobs, applied between steps."""
        self._send(tuning)

    def latency_fit(self) -> dict[str, float] | None:
        return self.engine.latency_fit()

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
        self.engine.check_ranks()
        if self._loop_task is not None and self._loop_task.done():
            raise EngineDeadError("engine loop is not running")
        busy = self.engine.has_unfinished or not self._commands.empty()
        if busy and time.monotonic() - self.last_step_end > stall_seconds:
            raise EngineDeadError(f"engine step loop stalled for over {stall_seconds:.0f}s")

    async def shutdown(self) -> None:
        """Stops the step loop; streams still open, and any later `generate`, get EngineDeadError."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            # A loop that died has already reported why (stats, check_health, its streams):
            # shutting down must not raise that again.
            await asyncio.gather(self._loop_task, return_exceptions=True)
        if self._dead is None:
            self._dead = EngineDeadError("the engine was shut down")
            for stream in self._streams.values():
                stream.put_nowait(self._dead)
        self._executor.shutdown(wait=True)
        self.engine.shutdown()

    # ---- the loop ------------------------------------------------------------------------
    def _send(self, command: _Add | str | SchedulerConfig) -> None:
        self._commands.put(command)
        if self._wake is not None:
            self._wake.set()

    def _apply_commands(self) -> list[tuple[str, RequestOutput | BaseException]]:
        """Runs on the step thread. Returns what callers learn at once: the final output of an
        aborted request (so an `abort()` ends its stream), or why a request failed to start."""
        early: list[tuple[str, RequestOutput | BaseException]] = []
        while not self._commands.empty():
            cmd = self._commands.get()
            if isinstance(cmd, SchedulerConfig):
                self.engine.reconfigure(cmd)
            elif isinstance(cmd, str):
                aborted = self.engine.abort_request(cmd)
                if aborted is not None:
                    early.append((cmd, aborted))
            else:
                try:
                    self.engine.add_request(cmd.request_id, cmd.prompt_ids, cmd.params, cmd.priority, cmd.continuation)
                except Exception as err:  # noqa: BLE001 - reported to that request's caller
                    early.append((cmd.request_id, err))
        return early

    def _step(self) -> tuple[list[RequestOutput], list[tuple[str, RequestOutput | BaseException]]]:
        early = self._apply_commands()
        try:
            outputs = self.engine.step() if self.engine.has_unfinished else []
        except EngineDeadError:
            raise  # a lost tensor-parallel rank cannot be recovered here: the loop dies, health fails
        except StepFailedError as err:  # one bad step fails its own requests, not the loop
            log.exception("engine step failed; failing the %d requests it ran", len(err.request_ids))
            outputs = self.engine.fail_requests(err.request_ids, str(err))
        except Exception as err:  # noqa: BLE001 - outside the model: which requests it left broken is unknown
            log.exception("engine step failed outside the model; failing every request")
            outputs = self.engine.fail_requests(list(self.engine.requests), f"engine step failed: {type(err).__name__}: {err}")
        self._stats = self.engine.stats()
        self.last_step_end = time.monotonic()
        return outputs, early

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        try:
            while True:
                if not self.engine.has_unfinished and self._commands.empty():
                    await self._wake.wait()
                self._wake.clear()
                outputs, early = await loop.run_in_executor(self._executor, self._step)
                for request_id, item in early:
                    self._deliver(request_id, item)
                for out in outputs:
                    self._deliver(out.request_id, out)
        except asyncio.CancelledError:
            raise
        except BaseException as err:
            log.exception("engine loop died")
            self._dead = err
            dead = EngineDeadError(f"engine loop died: {err!r}")
            for stream in self._streams.values():
                stream.put_nowait(dead)
            raise

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put_nowait(item)
