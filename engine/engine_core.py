"""The engine core: the step loop that owns an `LLMEngine`, and the two places it runs.

    ThreadCore   on a thread of the caller's process (the engine object stays reachable)
    ProcessCore  as the main thread of a process of its own (`EngineConfig.core_process`)

Both take commands (a request to add, a request id to abort, new scheduler knobs) between steps
and hand a step's outputs back in one `StepReport`, whatever the number of streams, or none when
every stream's outputs are held for its flush interval (engine/output_hold.py).

NOTE: the process is the default because a step runs slower on any thread but a process's main
one (PyTorch's and our kernels' OpenMP regions: ~1.3-1.5x the time of the same matmul on a
2-core host) and shares the GIL with the caller's event loop, serialisation and, in a Serve
replica, Ray's own threads. vLLM's engine core runs apart for the same reasons. The thread stays
for engines whose tensor-parallel ranks a caller launches itself (as Ray actors in a placement
group): a child process could not start those.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import torch

from engine.checkpoint import default_model_dir
from engine.config import EngineConfig, LoRAConfig, SchedulerConfig
from engine.core_socket import CoreSocket
from engine.llm_engine import LLMEngine
from engine.lora_request import LoRARequest
from engine.model_config import ModelConfig
from engine.output_hold import OutputHold, flush_interval
from engine.outputs import EngineDeadError, EngineStats, RequestOutput, StepFailedError
from engine.ranks import RankPlacement, WorkerLauncher
from engine.request_limits import RequestLimits
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

_FIT_INTERVAL_S = 0.25  # how often a report carries the latency controller's fit


@dataclass
class AddRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    priority: int
    continuation: bool
    lora: LoRARequest | None = None
    whole: bool = False  # every output in one delivery when the request ends (engine/output_hold.py)


Command = AddRequest | str | SchedulerConfig  # a str aborts that request id
Delivery = tuple[str, RequestOutput | BaseException]
SHUTDOWN = "__shutdown__"  # to the core process: stop after this step


@dataclass
class StepReport:
    """What a step (and the commands applied before it) tells the front."""

    delivered: list[Delivery]
    stats: EngineStats
    step_end: float  # time.monotonic(): one clock for every process of the host
    tuning: SchedulerConfig | None = None  # the knobs in force, when a command changed them
    latency_fit: dict[str, float] | None = None
    has_fit: bool = False  # latency_fit is fresh (it is sent every _FIT_INTERVAL_S)


@dataclass(frozen=True)
class CoreInfo:
    """What the front needs of a loaded engine to take requests without asking the core."""

    limits: RequestLimits
    tuning: SchedulerConfig
    stats: EngineStats
    cpu_threads: int  # what the core's steps compute on (engine/host_cpus.py)
    model_config: ModelConfig  # what an adapter is checked against
    lora: LoRAConfig


@dataclass
class CoreLoop:
    """Applies commands and steps; runs wherever the core runs."""

    engine: LLMEngine
    hold: OutputHold = field(default_factory=OutputHold)
    _last_fit: float = field(default=0.0)

    def info(self) -> CoreInfo:
        engine = self.engine
        return CoreInfo(engine.limits, engine.config.scheduler, engine.stats(), torch.get_num_threads(),
                        engine.model_config, engine.config.lora)

    def step(self, commands: list[Command]) -> StepReport:
        delivered: list[Delivery] = []
        tuning = None
        for cmd in commands:
            if isinstance(cmd, SchedulerConfig):
                self.engine.reconfigure(cmd)
                tuning = cmd
            elif isinstance(cmd, str):
                aborted = self.engine.abort_request(cmd)
                held = self.hold.release(cmd)
                if aborted is not None:  # ends the stream of an `abort()` caller
                    delivered.extend((cmd, out) for out in [*held, aborted])
            else:
                try:
                    self.engine.add_request(cmd.request_id, cmd.prompt_ids, cmd.params, cmd.priority, cmd.continuation,
                                            cmd.lora)
                except Exception as err:  # noqa: BLE001 - reported to that request's caller
                    delivered.append((cmd.request_id, err))
                    continue
                if cmd.whole:
                    self.hold.hold_whole(cmd.request_id)
        try:
            outputs = self.engine.step() if self.engine.has_unfinished else []
        except EngineDeadError:
            raise  # a lost tensor-parallel rank cannot be recovered here: the loop dies, health fails
        except StepFailedError as err:  # one bad step fails its own requests, not the loop
            log.exception("engine step failed; failing the %d requests it ran", len(err.request_ids))
            outputs = self.engine.fail_requests(err.request_ids, str(err))
        except Exception as err:  # noqa: BLE001 - outside the model: which requests it left broken is unknown
            log.exception("engine step failed outside the model; failing every request")
            outputs = self.engine.fail_requests(list(self.engine.requests),
                                                f"engine step failed: {type(err).__name__}: {err}")
        now = time.monotonic()
        interval = flush_interval(self.engine.config.scheduler, len(self.engine.requests))
        delivered.extend((out.request_id, out) for out in self.hold.take(outputs, now, interval))
        report = StepReport(delivered, self.engine.stats(), now, tuning)
        if tuning is not None or now - self._last_fit > _FIT_INTERVAL_S:
            report.latency_fit, report.has_fit, self._last_fit = self.engine.latency_fit(), True, now
        return report


Deliver = Callable[[StepReport], None]  # called on the event loop
Die = Callable[[BaseException], None]  # called on the event loop, once, when the core is lost


class ThreadCore:
    def __init__(self, config: EngineConfig, launcher: WorkerLauncher, placement: RankPlacement) -> None:
        self.engine = LLMEngine(config, launcher, placement)
        self.tokenizer = self.engine.tokenizer
        self._core = CoreLoop(self.engine)
        self.info = self._core.info()
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._work = threading.Event()  # set when a command arrives or on close
        self._stopping = False
        self._thread: threading.Thread | None = None

    async def start(self, loop: asyncio.AbstractEventLoop, deliver: Deliver, die: Die) -> None:
        self._thread = threading.Thread(target=self._run, args=(loop, deliver, die), name="engine-step", daemon=True)
        self._thread.start()

    def send(self, command: Command) -> None:
        self._commands.put(command)
        self._work.set()

    def alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()

    def check_ranks(self) -> None:
        self.engine.check_ranks()

    async def aclose(self) -> None:
        """Stops the thread (after at most a step), then the ranks."""
        self._stopping = True
        self._work.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self.engine.shutdown()

    def _run(self, loop: asyncio.AbstractEventLoop, deliver: Deliver, die: Die) -> None:
        def post(fn: Callable[[Any], None], arg: Any) -> None:
            if not loop.is_closed():  # a front that never shut down may have closed its loop
                loop.call_soon_threadsafe(fn, arg)

        try:
            while not self._stopping:
                self._work.clear()  # before looking, so a command sent after the look wakes the wait
                if not self.engine.has_unfinished and self._commands.empty():
                    self._work.wait()
                    continue
                commands = []
                while not self._commands.empty():
                    commands.append(self._commands.get())
                report = self._core.step(commands)
                if report.delivered or report.tuning is not None or report.has_fit:
                    post(deliver, report)
        except BaseException as err:  # noqa: BLE001 - reported to every stream and to health checks
            log.exception("engine loop died")
            post(die, err)


# ---- the engine core process ---------------------------------------------------------------------
class ProcessCore:
    """Starts `python -m engine.engine_core FD` with one end of a socket pair; messages are
    pickled both ways (`multiprocessing.connection` framing; the front's end is an asyncio
    transport once started, engine/core_socket.py). The child's stdout and stderr are the
    caller's (a Serve replica's log)."""

    def __init__(self, config: EngineConfig) -> None:
        if config.model is None:  # resolved here, so the front and the core read the same folder
            config = config.model_copy(update={"model": str(default_model_dir())})
        self.tokenizer = Tokenizer.from_dir(config.model, config.chat_template)  # the front encodes prompts
        self._sock, theirs = socket.socketpair()
        # The child imports what this process imports, wherever that comes from. OpenMP reads its wait
        # policy once, at start: only a process of our own can take `cpu_wait`.
        env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "OMP_WAIT_POLICY": "PASSIVE"}
        if config.cpu_wait == "spin":  # GNU OpenMP's own default: spin ~3 ms, then sleep (ACTIVE: minutes)
            del env["OMP_WAIT_POLICY"]
        self._proc = subprocess.Popen([sys.executable, "-m", "engine.engine_core", str(theirs.fileno())],
                                      pass_fds=(theirs.fileno(),), env=env)
        theirs.close()
        with Connection(os.dup(self._sock.fileno())) as conn:  # blocking, for the load
            conn.send(config)
            try:
                reply = conn.recv()
            except EOFError:
                reply = EngineDeadError(f"the engine process exited while loading (code {self._proc.wait()})")
        if isinstance(reply, BaseException):
            self._sock.close()
            self._proc.wait()
            raise reply
        self.info: CoreInfo = reply
        self._socket: CoreSocket | None = None
        self._unsent: list[Command] = []  # sent before start()

    async def start(self, loop: asyncio.AbstractEventLoop, deliver: Deliver, die: Die) -> None:
        def on_message(report: StepReport | BaseException) -> None:
            if isinstance(report, BaseException):
                self._close()
                die(report)
            else:
                deliver(report)

        def on_lost(err: Exception | None) -> None:
            die(EngineDeadError(f"the engine process ended (exit code {self._proc.poll()}; {err!r})"))

        self._socket = await CoreSocket.open(self._sock, on_message, on_lost)
        for command in self._unsent:
            self._socket.send(command)
        self._unsent.clear()

    def send(self, command: Command) -> None:
        if self._socket is None:
            self._unsent.append(command)
        else:
            self._socket.send(command)

    def alive(self) -> bool:
        return self._proc.poll() is None

    def check_ranks(self) -> None:
        """The core checks its own ranks each step, and exits when one is lost."""

    async def aclose(self) -> None:
        if self.alive() and self._socket is not None:
            self._socket.send(SHUTDOWN)
        self._close()  # after what was sent is written: the process stops at SHUTDOWN or at the end
        try:
            await asyncio.to_thread(self._proc.wait, 30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            await asyncio.to_thread(self._proc.wait)

    def _close(self) -> None:
        if self._socket is not None:
            self._socket.close()
        else:
            self._sock.close()


def serve(conn: Connection) -> None:
    """The core process's loop: load, then step while there is work, block on the socket when not."""
    config: EngineConfig = conn.recv()
    try:
        core = CoreLoop(LLMEngine(config))
    except BaseException as err:  # noqa: BLE001 - the front raises it
        conn.send(err)
        return
    # NOTE: what the load left (torch's modules, the tokenizer's tables) lives as long as the process;
    # frozen, the collector stops walking it. Held outputs and reports make the steps allocate a lot,
    # and each collection walked that whole heap: with 64 streams of the tiny checkpoint this loop took
    # 4.5 ms a step against the synchronous engine's 3.5 (0.7 ms in the collector; pickling a report
    # 25 ms instead of 6), 3.9 frozen. A Serve replica, the front reading those reports, freezes its
    # own too (17% of a front's time went to the collector). vLLM's engine core freezes its heap after
    # start-up for the same reason.
    gc.freeze()
    conn.send(core.info())
    try:
        while True:
            commands: list[Command] = []
            if not core.engine.has_unfinished:
                commands.append(conn.recv())  # idle: wait for work
            while conn.poll():
                commands.append(conn.recv())
            if SHUTDOWN in commands:
                break
            report = core.step(commands)
            if report.delivered or report.tuning is not None or report.has_fit:
                conn.send(report)
    except (EOFError, OSError):
        pass  # the front is gone
    except BaseException as err:  # noqa: BLE001 - the front fails every stream with it
        log.exception("engine loop died")
        conn.send(EngineDeadError(f"engine loop died: {err!r}"))
    finally:
        core.engine.shutdown()


if __name__ == "__main__":
    # NOTE: the front owns this process's life (it ends at the front's shutdown or when the socket
    # closes): a Ctrl-C in a terminal reaches the whole process group and must not kill a step.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Through the module's real name, so what it pickles names engine.engine_core, not __main__.
    from engine import engine_core  # noqa: PLW0406

    engine_core.serve(Connection(int(sys.argv[1])))
    # NOTE: out without the interpreter's teardown, once `serve` has stopped the ranks and the logs are
    # flushed: with the load's heap frozen, the teardown left it in place and Triton's bindings (which
    # torch imports) printed each of their objects in it as a leak, ~40 lines in a replica's log;
    # unfrozen, the teardown collected it all, 0.55 s more on every engine's shutdown.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
