"""Streamed outputs held in the engine core for a tier's flush interval (engine/output_hold.py): the
rule on scripted steps, then what a reader of `AsyncEngine.stream` gets and what the front is spared."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig, SchedulerConfig
from engine.output_hold import OutputHold, flush_interval
from engine.outputs import ChoiceDelta, RequestOutput
from engine.sampling_params import SamplingParams
from tests.engine_support import count_handoffs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def out(rid: str, token: int, finished: bool = False, error: str | None = None) -> RequestOutput:
    return RequestOutput(rid, [ChoiceDelta(0, [token], f"t{token}")], finished, 3, 0, token + 1, error=error)


def tokens(outputs: list[RequestOutput], rid: str) -> list[int]:
    return [t for o in outputs if o.request_id == rid for c in o.choices for t in c.token_ids]


# ---- the rule, on scripted steps -----------------------------------------------------------------
def test_no_interval_delivers_every_step() -> None:
    hold = OutputHold()
    for step in range(4):
        assert tokens(hold.take([out("a", step), out("b", step)], now=step * 0.01, interval=0.0), "b") == [step]
    hold.take([out("a", 4, finished=True), out("b", 4, finished=True)], now=0.05, interval=0.0)
    assert len(hold) == 0


def test_first_token_at_once_then_one_delivery_per_interval_and_the_last_at_once() -> None:
    hold = OutputHold()
    delivered = []
    for step in range(12):  # a step every 10 ms, a 35 ms interval
        delivered.append(tokens(hold.take([out("a", step, finished=step == 11)], step * 0.01, 0.035), "a"))
    assert delivered[0] == [0]  # never held
    assert [t for d in delivered for t in d] == list(range(12))  # nothing lost or reordered
    assert [d for d in delivered if d] == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11]]
    assert len(hold) == 0


def test_streams_keep_their_own_rhythm() -> None:
    hold = OutputHold()
    assert tokens(hold.take([out("a", 0)], 0.0, 0.05), "a") == [0]
    assert hold.take([out("a", 1)], 0.03, 0.05) == []
    got = hold.take([out("a", 2), out("b", 0)], 0.04, 0.05)  # b's first token goes; a's wait
    assert tokens(got, "b") == [0] and tokens(got, "a") == []
    got = hold.take([out("a", 3), out("b", 1)], 0.06, 0.05)
    assert tokens(got, "a") == [1, 2, 3] and tokens(got, "b") == []


def test_held_steps_merge_into_one_output_that_keeps_each_steps_time() -> None:
    """Two choices; the second finishes a step before the first. What the interval held goes as one
    output: each choice's tokens and text in order, its own finish reason, every step's time."""

    def step(i: int, choices: dict[int, str | None], finished: bool = False) -> RequestOutput:
        deltas = [ChoiceDelta(c, [10 * c + i], f"{c}.{i} ", finish_reason=reason) for c, reason in choices.items()]
        return RequestOutput("a", deltas, finished, 3, 0, 2 * i + 2, queue_time=0.5, step_times=[i / 100])

    hold = OutputHold()
    assert len(hold.take([step(0, {0: None, 1: None})], 0.0, 1.0)) == 1  # the first at once
    assert hold.take([step(1, {0: None, 1: None})], 0.01, 1.0) == []
    assert hold.take([step(2, {0: None, 1: "stop"})], 0.02, 1.0) == []
    [got] = hold.take([step(3, {0: "length"}, finished=True)], 0.03, 1.0)
    first, second = got.choices
    assert (first.index, first.token_ids, first.text, first.finish_reason) == (0, [1, 2, 3], "0.1 0.2 0.3 ", "length")
    assert (second.index, second.token_ids, second.text, second.finish_reason) == (1, [11, 12], "1.1 1.2 ", "stop")
    assert got.step_times == [0.01, 0.02, 0.03] and got.finished and got.num_output_tokens == 8
    assert got.queue_time == 0.5 and len(hold) == 0


def test_a_failed_output_goes_at_once_after_what_was_held() -> None:
    hold = OutputHold()
    hold.take([out("a", 0)], 0.0, 1.0)
    hold.take([out("a", 1)], 0.01, 1.0)
    got = hold.take([out("a", 2, error="boom")], 0.02, 1.0)
    assert tokens(got, "a") == [1, 2] and got[-1].error == "boom"
    assert len(hold) == 0


def test_whole_requests_get_everything_when_they_end() -> None:
    hold = OutputHold()
    hold.hold_whole("a")
    assert all(hold.take([out("a", step)], step * 10.0, 0.0) == [] for step in range(5))
    assert tokens(hold.take([out("a", 5, finished=True)], 60.0, 0.0), "a") == list(range(6))
    assert len(hold) == 0


def test_release_hands_back_what_an_aborted_request_had_held() -> None:
    hold = OutputHold()
    hold.take([out("a", 0)], 0.0, 1.0)
    hold.take([out("a", 1), out("b", 0)], 0.01, 1.0)
    assert tokens(hold.release("a"), "a") == [1]
    assert hold.release("a") == [] and hold.release("never-seen") == []
    assert len(hold) == 1  # b's


def test_message_cap_widens_the_interval_with_the_requests() -> None:
    def interval(requests: int, **tuning: Any) -> float:
        return flush_interval(SchedulerConfig(**tuning), requests)

    assert interval(64, stream_flush_ms=0) == 0.0
    assert interval(1, stream_flush_ms=50, stream_max_messages_per_s=150) == 0.05
    assert interval(16, stream_flush_ms=50, stream_max_messages_per_s=150) == 16 / 150
    assert interval(64, stream_flush_ms=50, stream_max_messages_per_s=150) == 64 / 150


# ---- through AsyncEngine ---------------------------------------------------------------------------
def engine_config(ckpt: Path, flush_ms: float, core_process: bool) -> EngineConfig:
    return EngineConfig(model=str(ckpt), dtype="float32", load_progress=False, core_process=core_process,
                        cache={"kv_cache_bytes": "8MiB"},
                        scheduler={"max_num_seqs": 8, "max_num_batched_tokens": 64, "stream_flush_ms": flush_ms})


@pytest.mark.parametrize("core_process", [True, False], ids=["process", "thread"])
def test_held_steps_cost_the_front_no_hand_off(tiny_checkpoint: Path, core_process: bool) -> None:
    """A 1 s flush interval (40 tokens take far less): each stream is read twice (its first token,
    then the rest when it finishes, merged into one output), and the event loop is handed a report
    a few times, not once per step; the outputs still carry when the engine made each token."""
    streams, n_tokens = 4, 40
    params = SamplingParams(temperature=0.0, max_tokens=n_tokens, ignore_eos=True)

    async def main() -> None:
        engine = AsyncEngine(engine_config(tiny_checkpoint, 1000, core_process))
        handoffs = count_handoffs(engine)
        try:
            steps_before = engine.stats().steps_total

            async def reads(i: int) -> list[list[RequestOutput]]:
                return [outs async for outs in engine.stream(f"s{i}", [5 + i, 6, 7, 8], params)]

            results = await asyncio.gather(*(reads(i) for i in range(streams)))
            steps = engine.stats().steps_total - steps_before
            for got in results:
                assert [len(outs) for outs in got] == [1, 1]
                assert [len(o.choices[0].token_ids) for outs in got for o in outs] == [1, n_tokens - 1]
                made = [t for outs in got for o in outs for t in o.step_times]
                assert made == sorted(made) and len(set(made)) == n_tokens  # one step each
            assert steps >= n_tokens
            # First tokens and finishes (at most one report each per stream), and the latency
            # fit's report every 0.25 s; held steps none.
            assert handoffs() <= 2 * streams + 1 + steps // 4, (handoffs(), steps)
            assert handoffs() < steps / 2, (handoffs(), steps)
        finally:
            await engine.shutdown()

    asyncio.run(asyncio.wait_for(main(), timeout=120))


def test_whole_and_aborted_streams_lose_nothing(tiny_checkpoint: Path) -> None:
    """`whole`: one read at the end, even at no flush interval. An aborted stream's reader gets what
    was held, then the abort; nothing stays held in the core, no KV block stays used."""

    async def main() -> None:
        engine = AsyncEngine(engine_config(tiny_checkpoint, 1000, core_process=False))
        hold = engine.core._core.hold
        try:
            whole = [outs async for outs in engine.stream("w", [5, 6, 7], SamplingParams(max_tokens=12,
                                                                                           ignore_eos=True),
                                                          whole=True)]
            assert len(whole) == 1 and sum(len(c.token_ids) for o in whole[0] for c in o.choices) == 12

            got: list[RequestOutput] = []
            async for outs in engine.stream("a", [5, 6, 7], SamplingParams(max_tokens=4000, ignore_eos=True)):
                got += outs
                if len(got) == 1:  # the first token; let the engine make and hold more, then abort
                    while engine.engine.requests["a"][0].num_output_tokens < 6:
                        await asyncio.sleep(0.005)
                    await engine.abort("a")
            assert got[-1].finished and got[-1].choices[0].finish_reason == "abort"
            assert sum(len(c.token_ids) for o in got for c in o.choices) == got[-1].num_output_tokens >= 6
            assert len(hold) == 0 and engine.stats().kv_blocks_used == 0
        finally:
            await engine.shutdown()

    asyncio.run(asyncio.wait_for(main(), timeout=120))
