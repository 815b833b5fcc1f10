"""The fixed-latency tier's engine logic: batch caps that hold a step-time target.

A simulated engine (a step-time function of the batch) shows the caps converge below the
target, follow a change in cost online, and never stall; the real scheduler shows it obeys them.
"""

from __future__ import annotations

import random
import statistics

import pytest

from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.latency_controller import LatencyController
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams


def simulate(ctl: LatencyController, step_seconds, steps: int, prompt: int = 40, output: int = 30,
             seed: int = 0) -> list[tuple[int, float]]:
    """An endless queue served under the controller's caps: (batch size, step seconds) per step.

    Prompts are chunked into the token budget like the scheduler does; each sequence then
    decodes `output` tokens and leaves.
    """
    rng = random.Random(seed)
    running: list[list[int]] = []  # [prompt tokens left, output tokens left]
    history = []
    for _ in range(steps):
        cap = ctl.max_seqs(max_num_seqs=256)
        budget = ctl.step_tokens(max(len(running), cap), max_num_batched_tokens=4096)
        chunks = []
        for seq in running:
            chunks.append(min(seq[0], budget - sum(chunks)) if seq[0] > 0 else 1)
        while len(running) < cap and budget - sum(chunks) > 0:
            fits = ctl.step_tokens(len(chunks) + 1, max_num_batched_tokens=budget) - sum(chunks)
            if min(prompt, budget - sum(chunks), fits) <= 0:
                break
            running.append([prompt, output])
            chunks.append(min(prompt, budget - sum(chunks), fits))
        tokens = sum(chunks)
        seconds = step_seconds(len(running), tokens - len(running)) * rng.uniform(0.9, 1.1)
        ctl.observe(seconds, len(running), tokens)
        history.append((len(running), seconds))
        for seq, n in zip(running, chunks):
            if seq[0] > 0:
                seq[0] -= n
            else:
                seq[1] -= 1
        running = [s for s in running if s[1] > 0]
    return history


def linear(overhead: float, per_seq: float, per_token: float):
    return lambda seqs, extra: overhead + per_seq * seqs + per_token * extra


@pytest.mark.parametrize(("overhead", "per_seq", "per_token"), [
    (0.002, 0.0005, 0.00002),  # per-sequence cost dominates
    (0.005, 0.0001, 0.00001),  # fixed overhead dominates (small models on CPUs)
    (0.0, 0.001, 0.0001),
])
def test_caps_converge_under_the_target(overhead: float, per_seq: float, per_token: float) -> None:
    target = 0.01
    ctl = LatencyController(target)
    history = simulate(ctl, linear(overhead, per_seq, per_token), steps=600)
    steady = history[100:]
    # The largest batch that keeps the mean step on target, prompts' cost spread over outputs.
    # The controller gets well on the way (admission is greedy: prompt chunks get the room that
    # decodes leave, and it keeps a noise margin for the p90)...
    ideal = (target - overhead) / (per_seq + per_token * 40 / 30)
    assert statistics.mean(s for s, _ in steady) > 0.4 * ideal
    over = sum(1 for _, t in steady if t > target) / len(steady)
    assert over < 0.1  # ...while (at least) 90% of steps keep the target


def test_caps_follow_the_cost_online() -> None:
    target = 0.02
    ctl = LatencyController(target)
    cheap, dear = linear(0.002, 0.0005, 0.00002), linear(0.002, 0.001, 0.00004)
    before = simulate(ctl, cheap, steps=300)
    after = simulate(ctl, dear, steps=300, seed=1)  # the machine got twice as slow per sequence
    again = simulate(ctl, cheap, steps=300, seed=2)
    batch = [statistics.mean(s for s, _ in h[150:]) for h in (before, after, again)]
    assert batch[1] < 0.7 * batch[0] and batch[2] > 1.4 * batch[1]
    assert sum(1 for _, t in after[100:] if t > target) / 200 < 0.1


@pytest.mark.parametrize("spike", [0.0, 0.004, 0.006, 0.008, 0.010])
def test_noisy_narrow_batches_do_not_extrapolate_past_the_target(spike: float) -> None:
    """Batches of 4-6 whose small ones now and then wait for the cores (the serving processes
    busy): least squares then sees a high overhead and a flat per-sequence cost. The cap must
    still be a batch whose true step time fits what the target allows, and clean steps must
    still let it grow past the sizes measured."""
    ctl = LatencyController(0.036)
    sizes = [4, 5, 6, 5, 4, 6, 5, 4]
    for i in range(80):
        n = sizes[i % len(sizes)]
        seconds = 0.014 + 0.0022 * n + (0.0005 if i % 2 else -0.0005)
        ctl.observe(seconds + (spike if n == 4 and i % 3 == 0 else 0.0), n, n)
    cap = ctl.max_seqs(max_num_seqs=64)
    assert 0.014 + 0.0022 * cap <= ctl.allowed()
    if spike == 0.0:
        assert cap > 6


def test_an_unreachable_target_still_serves_one_sequence() -> None:
    ctl = LatencyController(0.001)
    history = simulate(ctl, linear(0.004, 0.001, 0.0001), steps=100)
    assert all(s == 1 for s, _ in history[10:])  # one at a time, never zero


def test_running_sequences_always_keep_decoding() -> None:
    ctl = LatencyController(0.01)
    for _ in range(20):
        ctl.observe(0.03, 10, 10)  # far over the target with 10 running
    assert ctl.max_seqs(max_num_seqs=64) < 10  # admit nobody new...
    assert ctl.step_tokens(10, max_num_batched_tokens=512) == 10  # ...but every running sequence decodes


def test_scheduler_obeys_the_controller(tiny_checkpoint) -> None:
    """A real engine with an unreachably small target admits one sequence at a time; with the
    target removed by reconfigure(), the configured cap applies again."""
    engine = LLMEngine(EngineConfig(
        model=str(tiny_checkpoint), cache=CacheConfig(kv_cache_bytes=16 * 2**20), load_progress=False,
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, itl_target_ms=1e-3),
    ))
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    for i in range(4):
        engine.add_request(f"r{i}", [1, 100 + i, 200 + i], params)
    peak = 0
    while engine.has_unfinished:
        engine.step()
        peak = max(peak, len(engine.scheduler.running))
    assert peak == 1
    engine.reconfigure(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256))
    assert engine.scheduler.controller is None
    for i in range(4):
        engine.add_request(f"s{i}", [1, 100 + i, 200 + i], params)
    engine.step()
    assert len(engine.scheduler.running) == 4
