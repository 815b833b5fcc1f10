"""Scheduling: preemption recomputes exactly, a request never outgrows the pool, requests that
could never complete are rejected up front (leaking nothing), and the priority policy.

Everything runs the `tiny` random-weight Mixtral in fp32 on CPU with small prompts.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.model_runner import kv_bytes_per_block
from engine.outputs import RequestError
from engine.sampling_params import SamplingParams
from engine_support import GREEDY, Requests, TINY, Result, add, assert_idle, drain, make_engine, rand_ids, run, step

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------
# Preemption


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_preemption_recomputes_exactly(tiny_checkpoint: Path, prefix_caching: bool) -> None:
    rng = random.Random(3)
    requests: Requests = {}
    for i in range(12):
        # Half greedy, half seeded sampling: a seeded row's generator must survive recompute.
        sp = SamplingParams(**GREEDY) if i % 2 else SamplingParams(temperature=1.0, seed=100 + i)
        sp = sp.model_copy(update={"max_tokens": 16, "ignore_eos": True})
        requests[f"r{i}"] = (rand_ids(rng, rng.randint(8, 40)), sp)

    big = make_engine(tiny_checkpoint, blocks=1024, max_num_batched_tokens=128, prefix_caching=prefix_caching)
    want = run(big, requests)
    assert big.stats().num_preemptions == 0

    # 40 blocks of 4 tokens: any one request fits (<= 14 blocks), all twelve at once do not.
    small = make_engine(tiny_checkpoint, blocks=40, max_num_batched_tokens=128, prefix_caching=prefix_caching)
    got = run(small, requests)
    assert small.stats().num_preemptions > 0
    for rid in requests:
        assert got[rid].choices[0].token_ids == want[rid].choices[0].token_ids, rid
        assert got[rid].choices[0].finish_reason == "length"
    assert_idle(small)


def test_unbounded_request_stops_at_pool_capacity(tiny_checkpoint: Path) -> None:
    """`max_tokens=None` on a pool smaller than the context: the request must end ("length")
    once it fills the pool, not preempt itself forever."""
    engine = make_engine(tiny_checkpoint, blocks=16, block_size=4, max_num_batched_tokens=64)
    params = SamplingParams(**GREEDY, max_tokens=None, ignore_eos=True)
    res = run(engine, {"r": ([5, 6, 7, 8, 9, 10, 11, 12, 13, 14], params)})
    choice = res["r"].choices[0]
    assert choice.finish_reason == "length"
    assert 10 + len(choice.token_ids) == engine.kv_capacity_tokens == 64
    assert_idle(engine)


# ---------------------------------------------------------------------------------------
# Up-front rejection


def test_too_long_requests_rejected_up_front(tiny_checkpoint: Path) -> None:
    engine = make_engine(tiny_checkpoint, blocks=32, block_size=4, max_model_len=64)  # pool: 128 tokens
    too_long = r"maximum context length is 64 tokens.*65 tokens \(64 in the prompt, 1 in the completion\)"
    with pytest.raises(RequestError, match=too_long) as err:
        engine.add_request("long-prompt", list(range(3, 67)), SamplingParams(max_tokens=1))
    assert err.value.param == "prompt"
    too_long = r"length is 64 tokens.*70 tokens \(60 in the prompt, 10 in the completion\)"
    with pytest.raises(RequestError, match=too_long) as err:
        engine.add_request("long-total", list(range(3, 63)), SamplingParams(max_tokens=10))
    assert err.value.param == "max_tokens"
    assert_idle(engine)

    pool = make_engine(tiny_checkpoint, blocks=32, block_size=4)  # model context 4096, pool 128 tokens
    with pytest.raises(RequestError, match=r"needs 140 tokens.*holds 128"):
        pool.add_request("big", list(range(3, 103)), SamplingParams(max_tokens=40))
    with pytest.raises(RequestError, match="empty"):
        pool.add_request("empty", [], SamplingParams())
    with pytest.raises(RequestError, match="32000"):
        pool.add_request("oov", [5, 32000], SamplingParams())
    assert_idle(pool)
    # Nothing leaked: the ids are free again and the engine serves.
    for eng in (engine, pool):
        res = run(eng, {"big": (list(range(3, 40)), SamplingParams(**GREEDY, max_tokens=4))})
        assert len(res["big"].choices[0].token_ids) == 4
        assert_idle(eng)


def test_offline_generate_with_a_rejected_prompt_leaks_nothing(tiny_checkpoint: Path) -> None:
    """`LLM.generate([ok, too_long])` raises; the accepted prompt must not stay queued and
    break (or run inside) the next call."""
    llm = LLM(model=str(tiny_checkpoint), dtype="float32", max_model_len=64, load_progress=False,
              cache={"kv_cache_bytes": 64 * kv_bytes_per_block(TINY, TINY.num_key_value_heads, 4, torch.float32), "block_size": 4})
    params = SamplingParams(**GREEDY, max_tokens=4)
    with pytest.raises(RequestError):
        llm.generate([[5, 6, 7], list(range(3, 80))], params)
    assert not llm.engine.has_unfinished, "the accepted prompt of a rejected batch is left queued"
    out = llm.generate([[5, 6, 7]], params)
    assert len(out) == 1 and len(out[0].token_ids) == 4


# ---------------------------------------------------------------------------------------
# Priority policy


def _finish_order(tiny_checkpoint: Path, policy: str) -> tuple[list[str], LLMEngine]:
    engine = make_engine(tiny_checkpoint, policy=policy, max_num_seqs=1, max_num_batched_tokens=64)
    params = SamplingParams(**GREEDY, max_tokens=3, ignore_eos=True)
    results: dict[str, Result] = {}
    order: list[str] = []
    for rid in ("a", "b", "c"):
        add(engine, {rid: ([5, 6, 7, 8], params)}, results, priority=5)
    order += step(engine, results)  # `a` is running now; `b` and `c` wait
    add(engine, {"urgent": ([9, 10, 11], params)}, results, priority=0)
    for _ in range(100):
        if not engine.has_unfinished:
            break
        order += step(engine, results)
    return order, engine


def test_priority_policy_schedules_urgent_request_first(tiny_checkpoint: Path) -> None:
    order, engine = _finish_order(tiny_checkpoint, "priority")
    assert order == ["a", "urgent", "b", "c"]
    assert_idle(engine)
    fcfs, _ = _finish_order(tiny_checkpoint, "fcfs")
    assert fcfs == ["a", "b", "c", "urgent"]


def test_priority_policy_keeps_waiting_queue_ordered_after_preemption(tiny_checkpoint: Path) -> None:
    """A preempted low-priority sequence must not jump ahead of a more urgent waiting one."""
    engine = make_engine(tiny_checkpoint, blocks=12, block_size=4, policy="priority", max_num_seqs=2)
    params = SamplingParams(**GREEDY, max_tokens=24, ignore_eos=True)
    results: dict[str, Result] = {}
    add(engine, {"high": (list(range(3, 11)), params)}, results, priority=0)
    add(engine, {"low": (list(range(20, 28)), params)}, results, priority=9)
    step(engine, results)  # both running (max_num_seqs=2)
    add(engine, {"mid": (list(range(40, 48)), params)}, results, priority=5)
    for _ in range(200):
        if engine.scheduler.num_preemptions:
            break
        step(engine, results)
    assert engine.scheduler.num_preemptions > 0
    waiting = [(s.priority, s.arrival_time) for s in engine.scheduler.waiting]
    assert waiting == sorted(waiting), [s.request_id for s in engine.scheduler.waiting]
    drain(engine, results)
    assert all(r.choices[0].finish_reason == "length" for r in results.values())
    assert_idle(engine)

