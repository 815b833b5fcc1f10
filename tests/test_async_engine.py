"""AsyncEngine tests: concurrent streams against the offline engine, cancellation and abort
freeing everything, a failing step, a dead loop, and the stats it reports.

Each test builds its own engine inside one `asyncio.run`: the step loop is bound to the event
loop that started it.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from multiprocessing import Pipe
from pathlib import Path
from typing import TypeVar

import pytest
import torch

from engine import engine_core
from engine.async_engine import AsyncEngine
from engine.checkpoint import PRESETS
from engine.config import EngineConfig
from engine.engine_core import SHUTDOWN, CoreInfo, ProcessCore, StepReport
from engine.llm_engine import LLMEngine
from engine.model_runner import StepOutput, kv_bytes_per_block
from engine.outputs import ChoiceDelta, EngineDeadError, RequestError, RequestFailedError, RequestOutput
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledSeq
from tests.engine_support import count_handoffs

TINY = PRESETS["tiny"]
T = TypeVar("T")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint: Path) -> Path:
    return tiny_checkpoint


def config(ckpt: Path, *, blocks: int = 1024, block_size: int = 4, max_num_seqs: int = 16,
           max_num_batched_tokens: int = 64, prefix_caching: bool = True, core_process: bool = True) -> EngineConfig:
    """`core_process=False` where a test reaches into the engine object (to inject faults)."""
    return EngineConfig(
        model=str(ckpt),
        dtype="float32",
        cache={
            "kv_cache_bytes": blocks * kv_bytes_per_block(TINY, TINY.num_key_value_heads, block_size, torch.float32),
            "block_size": block_size,
            "enable_prefix_caching": prefix_caching,
        },
        scheduler={"max_num_seqs": max_num_seqs, "max_num_batched_tokens": max_num_batched_tokens},
        load_progress=False,
        core_process=core_process,
    )


def rand_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, TINY.vocab_size) for _ in range(n)]


def offline(ckpt: Path, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list[int]]:
    """First-choice tokens of each request from the synchronous engine (one big pool)."""
    engine = LLMEngine(config(ckpt))
    tokens: dict[str, list[int]] = {rid: [] for rid in requests}
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    while engine.has_unfinished:
        for out in engine.step():
            for delta in out.choices:
                tokens[out.request_id] += delta.token_ids
    return tokens


async def collect(engine: AsyncEngine, rid: str, prompt: list[int], params: SamplingParams) -> list[RequestOutput]:
    outs = [out async for out in engine.generate(rid, prompt, params)]
    assert outs and outs[-1].finished and not any(o.finished for o in outs[:-1]), rid
    return outs


def tokens_of(outs: list[RequestOutput]) -> list[int]:
    return [t for out in outs for delta in out.choices for t in delta.token_ids]


async def wait_idle(engine: AsyncEngine, timeout: float = 10.0) -> None:
    """Waits until no request holds KV blocks or a scheduler slot."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        s = engine.stats()
        if (s.kv_blocks_used, s.num_running, s.num_waiting) == (0, 0, 0):
            return
        assert loop.time() < deadline, f"engine not idle after {timeout}s: {s}"
        await asyncio.sleep(0.01)


def run(main: Callable[[], Awaitable[T]]) -> T:
    # A hang in the engine must fail the test, not stall the suite.
    return asyncio.run(asyncio.wait_for(main(), timeout=120))


def mixed_requests(rng: random.Random, n: int, max_tokens: int = 8) -> dict[str, tuple[list[int], SamplingParams]]:
    """Greedy and seeded requests: both give the same tokens whatever the batch."""
    return {
        f"r{i}": (
            rand_ids(rng, rng.randint(1, 60)),
            SamplingParams(temperature=0.0 if i % 2 else 0.8, seed=i, max_tokens=max_tokens, ignore_eos=True),
        )
        for i in range(n)
    }


# ---------------------------------------------------------------------------------------


def test_concurrent_streams_match_offline(ckpt: Path) -> None:
    requests = mixed_requests(random.Random(1), 24)
    want = offline(ckpt, requests)

    async def main() -> None:
        engine = AsyncEngine(config(ckpt))
        try:
            outs = await asyncio.gather(*(collect(engine, rid, p, sp) for rid, (p, sp) in requests.items()))
            for rid, out in zip(requests, outs):
                assert tokens_of(out) == want[rid], rid
                assert out[-1].choices[-1].finish_reason == "length"
            s = engine.stats()
            assert s.healthy and s.error is None
            assert (s.kv_blocks_used, s.num_running, s.num_waiting, s.num_preemptions) == (0, 0, 0, 0)
            assert s.prompt_tokens_total == sum(len(p) for p, _ in requests.values())
            assert s.generation_tokens_total == 8 * len(requests)
            # Each computed token (all but the last sampled one per sequence) went to 2 experts per layer.
            computed = s.prompt_tokens_total + s.generation_tokens_total - len(requests)
            assert [sum(layer) for layer in s.expert_tokens] == [2 * computed] * TINY.num_hidden_layers
            # Finished request ids can be used again.
            again = await collect(engine, "r0", *requests["r0"])
            assert tokens_of(again) == want["r0"]
        finally:
            await engine.shutdown()

    run(main)


def test_cancelled_streams_free_everything(ckpt: Path) -> None:
    rng = random.Random(2)
    requests = {
        f"c{i}": (rand_ids(rng, rng.randint(1, 40)), SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
        for i in range(50)
    }
    cut = {rid: rng.randint(0, 6) for rid in requests}  # outputs to read before leaving
    probe = (rand_ids(rng, 30), SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    want = offline(ckpt, {"probe": probe})["probe"]

    async def main() -> None:
        engine = AsyncEngine(config(ckpt, max_num_seqs=16))
        try:
            async def leave_by_break(rid: str) -> int:
                seen = 0
                async for out in engine.generate(rid, *requests[rid]):
                    assert not out.finished, "a cancelled request ran to completion; make max_tokens larger"
                    seen += 1
                    if seen >= cut[rid]:
                        break
                return seen

            async def consume(rid: str, reached: asyncio.Event) -> None:
                seen = 0
                async for out in engine.generate(rid, *requests[rid]):
                    assert not out.finished, "a cancelled request ran to completion; make max_tokens larger"
                    seen += 1
                    if seen >= cut[rid]:
                        reached.set()

            async def leave_by_cancel(rid: str) -> None:
                reached = asyncio.Event()
                task = asyncio.create_task(consume(rid, reached))
                if cut[rid]:
                    await reached.wait()
                else:
                    await asyncio.sleep(0)  # cancelled before any output, maybe before it was queued
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task

            ids = list(requests)
            await asyncio.gather(*(
                leave_by_break(rid) if i % 2 else leave_by_cancel(rid) for i, rid in enumerate(ids)
            ))
            await asyncio.sleep(0)  # let the closing of abandoned generators run
            steps_when_left = engine.stats().steps_total
            await wait_idle(engine)
            assert engine.stats().steps_total - steps_when_left <= 2
            assert engine.stats().healthy
            # Still serving, and correctly.
            assert tokens_of(await collect(engine, "probe", *probe)) == want
            await wait_idle(engine)
        finally:
            await engine.shutdown()

    run(main)


def test_explicit_abort_ends_stream_and_frees(ckpt: Path) -> None:
    rng = random.Random(3)
    victim = (rand_ids(rng, 20), SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True))
    bystander = (rand_ids(rng, 25), SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    want = offline(ckpt, {"bystander": bystander})["bystander"]

    async def main() -> None:
        engine = AsyncEngine(config(ckpt))
        try:
            async def watch_victim() -> list[RequestOutput]:
                outs = []
                async for out in engine.generate("victim", *victim):
                    outs.append(out)
                    if len(outs) == 2:
                        await engine.abort("victim")
                return outs

            victim_outs, bystander_outs = await asyncio.gather(
                asyncio.wait_for(watch_victim(), timeout=20), collect(engine, "bystander", *bystander)
            )
            # The aborted stream ends (it does not hang) with a final "abort" output.
            assert victim_outs[-1].finished
            assert victim_outs[-1].choices[-1].finish_reason == "abort"
            assert len(tokens_of(victim_outs)) < 60
            assert tokens_of(bystander_outs) == want
            await wait_idle(engine)
            # Aborting what is unknown or already done is harmless.
            await engine.abort("victim")
            await engine.abort("never-existed")
            assert tokens_of(await collect(engine, "after", *bystander)) == want
            await wait_idle(engine)
        finally:
            await engine.shutdown()

    run(main)


def test_failed_step_fails_only_in_flight_requests(ckpt: Path) -> None:
    rng = random.Random(4)
    early = (rand_ids(rng, 10), SamplingParams(temperature=0.0, max_tokens=1))
    long_greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    doomed = {f"d{i}": (rand_ids(rng, 12), long_greedy) for i in range(4)}
    later = mixed_requests(rng, 4)
    # Submitted behind the doomed four and waiting for a slot (max_num_seqs 4) when the step fails.
    queued = {f"q{rid}": req for rid, req in mixed_requests(rng, 3).items()}
    want = offline(ckpt, {"early": early, **later, **queued})

    async def main() -> None:
        engine = AsyncEngine(config(ckpt, max_num_seqs=4, core_process=False))
        runner = engine.engine.runner
        execute = runner.execute
        faulted = False

        def flaky_execute(batch: list[ScheduledSeq], allowed: dict[int, torch.Tensor] | None = None,
                          loads: list | None = None) -> StepOutput:
            # Fault once, in the first step where all four doomed requests are decoding.
            nonlocal faulted
            if not faulted and {s.seq.request_id for s in batch} == set(doomed) and all(
                s.seq.num_computed_tokens > 0 for s in batch
            ):
                faulted = True
                raise RuntimeError("injected device fault")
            return execute(batch, allowed, loads)

        runner.execute = flaky_execute  # type: ignore[method-assign]
        try:
            # `early` finishes in the first step, before the fault.
            assert tokens_of(await collect(engine, "early", *early)) == want["early"]

            async def expect_failure(rid: str) -> int:
                seen = 0
                with pytest.raises(RequestFailedError, match="injected device fault"):
                    async for _ in engine.generate(rid, *doomed[rid]):
                        seen += 1
                return seen

            failing = [asyncio.create_task(expect_failure(rid)) for rid in doomed]
            await asyncio.sleep(0)  # the doomed requests are queued first (FCFS)
            waiting = [asyncio.create_task(collect(engine, rid, p, sp)) for rid, (p, sp) in queued.items()]
            seen = await asyncio.gather(*failing)
            assert faulted
            assert all(n >= 1 for n in seen)  # they were mid-flight, not rejected up front
            for rid, out in zip(queued, await asyncio.gather(*waiting)):
                assert tokens_of(out) == want[rid], rid  # untouched by the failure
            await wait_idle(engine)
            s = engine.stats()
            assert s.healthy and engine.is_running
            engine.check_health(stall_seconds=60)
            outs = await asyncio.gather(*(collect(engine, rid, p, sp) for rid, (p, sp) in later.items()))
            for rid, out in zip(later, outs):
                assert tokens_of(out) == want[rid], rid
            await wait_idle(engine)
        finally:
            await engine.shutdown()

    run(main)


def test_dead_loop_reports_engine_dead(ckpt: Path) -> None:
    rng = random.Random(5)
    long_greedy = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    requests = {f"x{i}": (rand_ids(rng, 8), long_greedy) for i in range(3)}

    async def main() -> None:
        engine = AsyncEngine(config(ckpt, core_process=False))
        inner = engine.engine
        execute = inner.runner.execute
        calls = 0

        def failing_execute(batch: list[ScheduledSeq], allowed: dict[int, torch.Tensor] | None = None,
                          loads: list | None = None) -> StepOutput:
            nonlocal calls
            calls += 1
            if calls == 3:
                raise RuntimeError("injected step fault")
            return execute(batch, allowed, loads)

        def broken_fail_requests(request_ids: list[str], message: str) -> list[RequestOutput]:
            raise RuntimeError("injected: the error path itself broke")

        inner.runner.execute = failing_execute  # type: ignore[method-assign]
        inner.fail_requests = broken_fail_requests  # type: ignore[method-assign]
        try:
            async def waiter(rid: str) -> None:
                with pytest.raises(EngineDeadError):
                    async for _ in engine.generate(rid, *requests[rid]):
                        pass

            await asyncio.gather(*(waiter(rid) for rid in requests))
            s = engine.stats()
            assert not s.healthy and "injected" in (s.error or "")
            assert not engine.is_running
            with pytest.raises(EngineDeadError):
                engine.check_health(stall_seconds=60)
            with pytest.raises(EngineDeadError):
                async for _ in engine.generate("late", [5, 6, 7], SamplingParams(max_tokens=2)):
                    pass
        finally:
            await engine.shutdown()

    run(main)


def test_stats_stay_sane_under_preemption(ckpt: Path) -> None:
    rng = random.Random(6)
    requests = mixed_requests(rng, 12, max_tokens=16)
    want = offline(ckpt, requests)
    max_num_seqs = 8

    async def main() -> None:
        # 30 blocks of 4 tokens: requests fit one at a time, not all at once.
        engine = AsyncEngine(config(ckpt, blocks=30, max_num_seqs=max_num_seqs, prefix_caching=False))
        snapshots = []
        done = asyncio.Event()

        async def poll() -> None:
            while not done.is_set():
                snapshots.append(engine.stats())
                await asyncio.sleep(0.002)

        poller = asyncio.create_task(poll())
        try:
            outs = await asyncio.gather(*(collect(engine, rid, p, sp) for rid, (p, sp) in requests.items()))
            done.set()
            await poller
            for rid, out in zip(requests, outs):
                assert tokens_of(out) == want[rid], rid

            assert len(snapshots) > 10
            busy = [s for s in snapshots if s.num_running]
            assert busy, "the poller never saw a running request"
            for s in snapshots:
                assert 0 <= s.num_running <= max_num_seqs
                assert s.num_running + s.num_waiting <= len(requests)
                assert 0 <= s.kv_blocks_used <= s.kv_blocks_total == 30
                assert 0.0 <= s.kv_usage <= 1.0 and s.kv_capacity_tokens == 120
                assert s.healthy
            for a, b in zip(snapshots, snapshots[1:]):
                for name in ("num_preemptions", "prompt_tokens_total", "generation_tokens_total", "steps_total"):
                    assert getattr(b, name) >= getattr(a, name), name
            final = engine.stats()
            assert final.num_preemptions > 0
            assert final.generation_tokens_total == 16 * len(requests)
            # Preempted prompts are computed again, so at least every prompt token once.
            assert final.prompt_tokens_total >= sum(len(p) for p, _ in requests.values())
            assert final.prefix_cache_hits == 0 and final.steps_total > 0
            assert (final.kv_blocks_used, final.num_running, final.num_waiting) == (0, 0, 0)
        finally:
            done.set()
            await engine.shutdown()

    run(main)


def test_invalid_request_rejected_before_any_work(ckpt: Path) -> None:
    async def main() -> None:
        engine = AsyncEngine(config(ckpt, blocks=16))  # 64 tokens of KV
        try:
            with pytest.raises(RequestError, match=r"needs 70 tokens.*holds 64"):
                async for _ in engine.generate("big", list(range(3, 63)), SamplingParams(max_tokens=10)):
                    pass
            assert engine.stats().num_waiting == 0 and engine.stats().kv_blocks_used == 0
            outs = await collect(engine, "big", list(range(3, 13)), SamplingParams(temperature=0.0, max_tokens=3))
            assert len(tokens_of(outs)) == 3
        finally:
            await engine.shutdown()

    run(main)


def test_shutdown_ends_open_streams(ckpt: Path, capfd: pytest.CaptureFixture[str]) -> None:
    async def main() -> None:
        engine = AsyncEngine(config(ckpt))
        params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
        started = asyncio.Event()

        async def open_stream() -> None:
            with pytest.raises(EngineDeadError):
                async for _ in engine.generate("open", [5, 6, 7, 8], params):
                    started.set()

        task = asyncio.create_task(open_stream())
        await started.wait()
        await engine.shutdown()
        await asyncio.wait_for(task, timeout=10)  # ended, not left waiting forever
        assert not engine.stats().healthy
        with pytest.raises(EngineDeadError):
            async for _ in engine.generate("after", [5, 6, 7], params):
                pass

    run(main)
    # The core process (its stderr is ours) exits quietly: through the interpreter's teardown, Triton's
    # bindings (which torch imports) printed each of their objects left in its frozen heap as a leak.
    assert "leaked" not in capfd.readouterr().err


@pytest.mark.parametrize("core_process", [True, False], ids=["process", "thread"])
def test_work_per_step_not_per_token(ckpt: Path, core_process: bool) -> None:
    """Keeps the serving path's per-token work from coming back, without timing: the engine core
    hands the event loop one report per step whatever the number of streams, and a stream's
    reader wakes at most once per step (less when it fell behind)."""
    streams, tokens = 16, 24
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    rng = random.Random(7)

    async def main() -> None:
        engine = AsyncEngine(config(ckpt, max_num_seqs=streams, core_process=core_process))
        handoffs = count_handoffs(engine)
        try:
            steps_before = engine.stats().steps_total

            async def reads(rid: str) -> tuple[int, int]:
                n_reads = n_tokens = 0
                async for outs in engine.stream(rid, rand_ids(rng, 8), params):
                    n_reads += 1
                    n_tokens += sum(len(c.token_ids) for o in outs for c in o.choices)
                return n_reads, n_tokens

            results = await asyncio.gather(*(reads(f"w{i}") for i in range(streams)))
            await wait_idle(engine)
            steps = engine.stats().steps_total - steps_before
            assert all(n_tokens == tokens for _, n_tokens in results)
            assert all(n_reads <= tokens for n_reads, _ in results)
            # Each step's outputs for all 16 streams arrive in one hand-off (per-stream or
            # per-token hand-offs would be ~16x the steps).
            assert steps >= tokens
            assert handoffs() <= steps + 2, (handoffs(), steps)
        finally:
            await engine.shutdown()

    run(main)


def test_lost_core_process_fails_streams_and_health(ckpt: Path) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)

    async def main() -> None:
        engine = AsyncEngine(config(ckpt))
        assert isinstance(engine.core, ProcessCore)
        started = asyncio.Event()

        async def open_stream() -> None:
            with pytest.raises(EngineDeadError, match="engine process ended"):
                async for _ in engine.generate("open", [5, 6, 7, 8], params):
                    started.set()

        task = asyncio.create_task(open_stream())
        try:
            await started.wait()
            os.kill(engine.core._proc.pid, signal.SIGKILL)
            await asyncio.wait_for(task, timeout=10)
            assert not engine.stats().healthy and not engine.is_running
            with pytest.raises(EngineDeadError):
                engine.check_health(stall_seconds=60)
            with pytest.raises(EngineDeadError):
                async for _ in engine.generate("after", [5, 6, 7], params):
                    pass
        finally:
            await engine.shutdown()  # a lost core still shuts down cleanly

    run(main)


@pytest.mark.parametrize(("cpu_wait", "policy"), [("sleep", "PASSIVE"), ("spin", None)])
def test_cpu_wait_sets_the_core_process_openmp_policy(ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                                      cpu_wait: str, policy: str | None) -> None:
    """`spin` is GNU OpenMP's default (spin briefly, then sleep), whatever the caller's environment
    says: ACTIVE would keep an idle core's threads spinning for minutes."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")

    async def main() -> None:
        engine = AsyncEngine(config(ckpt).model_copy(update={"cpu_wait": cpu_wait}))
        assert isinstance(engine.core, ProcessCore)
        try:
            environ = Path(f"/proc/{engine.core._proc.pid}/environ").read_bytes().split(b"\0")
            found = [v.split(b"=", 1)[1].decode() for v in environ if v.startswith(b"OMP_WAIT_POLICY=")]
            assert found == ([policy] if policy else [])
        finally:
            await engine.shutdown()

    run(main)


def test_reports_and_prompts_larger_than_a_socket_read_on_serves_event_loop(ckpt: Path) -> None:
    """On uvloop (a Serve replica's loop, which makes the socket it watches non-blocking): reports of
    hundreds of KiB (sixteen streams' held outputs with 20 logprobs each, handed over at once) and
    prompts of thousands of tokens cross the core's socket whole, whatever one read or write takes."""
    import uvloop

    streams, n_tokens = 16, 96
    params = SamplingParams(temperature=0.0, max_tokens=n_tokens, ignore_eos=True, logprobs=20)
    rng = random.Random(11)
    long_prompts = {f"long{i}": rand_ids(rng, 3000) for i in range(4)}

    async def main() -> None:
        engine = AsyncEngine(config(ckpt, blocks=8192, max_num_seqs=streams, max_num_batched_tokens=4096))
        assert isinstance(engine.core, ProcessCore)
        try:
            async def whole(rid: str, prompt: list[int], p: SamplingParams) -> list[RequestOutput]:
                reads = [outs async for outs in engine.stream(rid, prompt, p, whole=True)]
                assert len(reads) == 1
                return reads[0]

            results = await asyncio.gather(*(whole(f"s{i}", rand_ids(rng, 8), params) for i in range(streams)))
            # One output each, its steps merged in the core (engine/output_hold.py).
            assert all(len(outs) == 1 and len(tokens_of(outs)) == n_tokens
                       and len(outs[0].choices[0].logprobs) == n_tokens
                       and all(len(lp.top) == 20 for lp in outs[0].choices[0].logprobs) for outs in results)
            one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
            firsts = await asyncio.gather(*(whole(rid, prompt, one) for rid, prompt in long_prompts.items()))
            assert [outs[-1].num_prompt_tokens for outs in firsts] == [3000] * len(long_prompts)
            assert engine.stats().healthy
        finally:
            await engine.shutdown()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(main(), timeout=120))


def test_outputs_before_a_failure_in_one_read_still_reach_the_reader(ckpt: Path) -> None:
    """A reader that fell behind can find a step's output and the next step's failure in one read:
    it gets the output first, then the error (a token a client was owed is not dropped)."""

    async def main() -> None:
        engine = AsyncEngine(config(ckpt, core_process=False))
        await engine.start()
        engine.core.send = lambda command: None  # type: ignore[method-assign] - this test plays the core
        token = RequestOutput("r", [ChoiceDelta(0, [7], "x")], False, 3, 0, 1)
        failed = RequestOutput("r", [], False, 3, 0, 1, error="injected device fault")
        seen: list[RequestOutput] = []

        async def read() -> None:
            with pytest.raises(RequestFailedError, match="injected device fault"):
                async for outs in engine.stream("r", [5, 6, 7], SamplingParams(max_tokens=4)):
                    seen.extend(outs)

        task = asyncio.create_task(read())
        await asyncio.sleep(0)  # the reader waits on its stream
        engine._deliver(StepReport([("r", token), ("r", failed)], engine.stats(), time.monotonic()))
        await asyncio.wait_for(task, timeout=10)
        assert seen == [token]
        await engine.shutdown()

    run(main)


def test_the_core_process_freezes_what_its_load_left(ckpt: Path) -> None:
    """Held outputs and reports make a core's steps allocate; the collector then must not walk the
    load's objects (torch's modules, the tokenizer's tables) each time. The core's loop, run here on a
    thread so its heap is this process's."""
    gc.unfreeze()
    front, core = Pipe()
    loop = threading.Thread(target=engine_core.serve, args=(core,), daemon=True)
    loop.start()
    try:
        assert gc.get_freeze_count() == 0
        front.send(config(ckpt))
        assert isinstance(front.recv(), CoreInfo)
        assert gc.get_freeze_count() > 0  # frozen before the core reported ready
    finally:
        front.send(SHUTDOWN)
        loop.join(timeout=60)
        gc.unfreeze()
    assert not loop.is_alive()
