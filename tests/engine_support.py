"""Helpers of the engine runtime tests: an engine with an exact KV pool, requests run step by
step with every delta collected, and the checks that nothing is left behind."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.async_engine import AsyncEngine
from engine.checkpoint import PRESETS
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.model_runner import kv_bytes_per_block
from engine.sampling_params import SamplingParams
from engine.sequence import TokenLogprob

TINY = PRESETS["tiny"]
GREEDY = dict(temperature=0.0)

def make_engine(
    ckpt: Path,
    *,
    blocks: int = 1024,
    block_size: int = 4,
    max_num_seqs: int | None = None,
    max_num_batched_tokens: int = 64,
    prefix_caching: bool = True,
    policy: str = "fcfs",
    max_model_len: int | None = None,
) -> LLMEngine:
    """An engine whose KV pool holds exactly `blocks` blocks of `block_size` tokens."""
    return LLMEngine(
        EngineConfig(
            model=str(ckpt),
            dtype="float32",
            max_model_len=max_model_len,
            cache={
                "kv_cache_bytes": blocks * kv_bytes_per_block(TINY, TINY.num_key_value_heads, block_size, torch.float32),
                "block_size": block_size,
                "enable_prefix_caching": prefix_caching,
            },
            scheduler={
                "max_num_seqs": max_num_seqs or min(32, max_num_batched_tokens),
                "max_num_batched_tokens": max_num_batched_tokens,
                "policy": policy,
            },
            load_progress=False,
        )
    )


def rand_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, TINY.vocab_size) for _ in range(n)]


@dataclass
class Choice:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    deltas: list[str] = field(default_factory=list)  # streamed text, one entry per delta
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass
class Result:
    choices: list[Choice]
    num_cached_tokens: int = 0
    finished: bool = False


Requests = dict[str, tuple[list[int], SamplingParams]]


def add(engine: LLMEngine, requests: Requests, results: dict[str, Result], priority: int = 0) -> None:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params, priority=priority)
        results[rid] = Result([Choice() for _ in range(params.n)])


def step(engine: LLMEngine, results: dict[str, Result]) -> list[str]:
    """One engine step folded into `results`; returns the ids of requests that finished."""
    done = []
    for out in engine.step():
        res = results[out.request_id]
        res.num_cached_tokens = out.num_cached_tokens
        for delta in out.choices:
            choice = res.choices[delta.index]
            choice.token_ids += delta.token_ids
            choice.text += delta.text
            choice.deltas.append(delta.text)
            choice.logprobs += delta.logprobs
            choice.finish_reason = delta.finish_reason
            choice.stop_reason = delta.stop_reason
        if out.finished:
            res.finished = True
            done.append(out.request_id)
    return done


def drain(engine: LLMEngine, results: dict[str, Result], max_steps: int = 3000) -> None:
    # A step cap turns a scheduler livelock into a failure instead of a hung test.
    for _ in range(max_steps):
        if not engine.has_unfinished:
            return
        step(engine, results)
    raise AssertionError(f"engine still has work after {max_steps} steps (livelock?): {engine.stats()}")


def run(engine: LLMEngine, requests: Requests) -> dict[str, Result]:
    results: dict[str, Result] = {}
    add(engine, requests, results)
    drain(engine, results)
    return results


def assert_idle(engine: LLMEngine) -> None:
    stats = engine.stats()
    assert (stats.kv_blocks_used, stats.num_running, stats.num_waiting) == (0, 0, 0), stats
    assert not engine.has_unfinished


def count_handoffs(engine: AsyncEngine) -> Callable[[], int]:
    """Counts the reports the engine core hands the event loop from now on (each a wake-up of the front)."""
    count = 0
    deliver = engine._deliver

    def counted(report: Any) -> None:
        nonlocal count
        count += 1
        deliver(report)

    engine._deliver = counted  # type: ignore[method-assign]
    return lambda: count
