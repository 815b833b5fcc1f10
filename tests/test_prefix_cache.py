"""Prefix caching through the engine: shared prefixes are reused, a hit is verified against
the tokens, and the least recently used blocks are evicted first.

Everything runs the `tiny` random-weight Mixtral in fp32 on CPU with small prompts.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

import engine.kv_cache as kv_cache
from engine.sampling_params import SamplingParams
from engine_support import GREEDY, Result, assert_idle, make_engine, rand_ids, run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------
# Prefix caching through the engine


def test_prefix_cache_reuses_shared_prefix(tiny_checkpoint: Path) -> None:
    rng = random.Random(4)
    prefix = rand_ids(rng, 40)  # 10 full blocks of 4
    a = prefix + rand_ids(rng, 5)
    b = prefix + rand_ids(rng, 7)
    exact = prefix  # a prompt that is all full blocks: the last one is recomputed
    params = SamplingParams(**GREEDY, max_tokens=8, logprobs=5, ignore_eos=True)

    engine = make_engine(tiny_checkpoint, block_size=4)
    got: dict[str, Result] = {}
    for rid, prompt in (("a", a), ("b", b), ("exact", exact), ("exact-again", exact)):
        before = engine.stats()
        got.update(run(engine, {rid: (prompt, params)}))
        after = engine.stats()
        cached = got[rid].num_cached_tokens
        assert after.prefix_cache_hits - before.prefix_cache_hits == cached
        assert after.prefix_cache_queries - before.prefix_cache_queries == len(prompt)
        assert after.prompt_tokens_total - before.prompt_tokens_total == len(prompt) - cached
    assert got["a"].num_cached_tokens == 0
    assert got["b"].num_cached_tokens == 40
    assert got["exact"].num_cached_tokens == 36  # at least one prompt token must be computed
    assert got["exact-again"].num_cached_tokens == 36
    assert_idle(engine)

    plain = make_engine(tiny_checkpoint, block_size=4, prefix_caching=False)
    for rid, prompt in (("a", a), ("b", b), ("exact", exact), ("exact-again", exact)):
        want = run(plain, {rid: (prompt, params)})[rid]
        assert want.num_cached_tokens == 0
        assert got[rid].choices[0].token_ids == want.choices[0].token_ids, rid
        for x, y in zip(got[rid].choices[0].logprobs, want.choices[0].logprobs):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4), rid
    assert plain.stats().prefix_cache_hits == 0


def test_blocks_after_a_prefix_prefilled_twice_at_once_are_found(tiny_checkpoint: Path) -> None:
    """Two requests share a prefix (a system prompt) and prefill it in the same step, so each computes
    its own copy; each one's later turn still finds every block of its own earlier prompt, and the
    answers are those of an engine without the cache."""
    rng = random.Random(9)
    system = rand_ids(rng, 24)  # 6 blocks of 4
    first = {name: system + rand_ids(rng, 13) for name in ("a", "b")}
    params = SamplingParams(**GREEDY, max_tokens=6, ignore_eos=True)
    engine = make_engine(tiny_checkpoint, block_size=4)
    turn1 = run(engine, {name: (prompt, params) for name, prompt in first.items()})  # one batch: twins
    plain = make_engine(tiny_checkpoint, block_size=4, prefix_caching=False)
    for name, prompt in first.items():
        history = prompt + turn1[name].choices[0].token_ids + rand_ids(rng, 9)
        again = run(engine, {f"{name}2": (history, params)})[f"{name}2"]
        assert again.num_cached_tokens >= len(prompt) // 4 * 4, name  # the whole earlier prompt's full blocks
        want = run(plain, {f"{name}2": (history, params)})[f"{name}2"]
        assert again.choices[0].token_ids == want.choices[0].token_ids, name
    assert_idle(engine)


@pytest.mark.parametrize(
    "colliding_hash",
    [lambda parent, tokens: hash(tokens), lambda parent, tokens: 0],
    ids=["ignores-parent", "constant"],
)
def test_prefix_cache_hit_is_verified(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, colliding_hash: Callable[[int | None, tuple[int, ...]], int]
) -> None:
    """With a hash that collides, a hit must still only hand out K/V computed under the
    same tokens *and* the same preceding blocks: block T after P is not block T after Q."""
    monkeypatch.setattr(kv_cache, "chain_hash", colliding_hash)
    rng = random.Random(5)
    p, q, t = rand_ids(rng, 8), rand_ids(rng, 8), rand_ids(rng, 8)
    prompts = {"a": p + t + [11], "c": q + t + [12], "b": q + t + [13, 14], "t": t + t + t + [15]}
    params = SamplingParams(**GREEDY, max_tokens=6, logprobs=0, ignore_eos=True)

    engine = make_engine(tiny_checkpoint, block_size=4)
    plain = make_engine(tiny_checkpoint, block_size=4, prefix_caching=False)
    for rid, prompt in prompts.items():  # one at a time, so each sees the others' cached blocks
        got = run(engine, {rid: (prompt, params)})[rid].choices[0]
        want = run(plain, {rid: (prompt, params)})[rid].choices[0]
        assert got.token_ids == want.token_ids, rid
        assert [x.logprob for x in got.logprobs] == pytest.approx([x.logprob for x in want.logprobs], abs=1e-4), rid
    assert_idle(engine)


def test_prefix_cache_lru_eviction(tiny_checkpoint: Path) -> None:
    """Freed cached blocks are evicted least recently used first, tail before prefix."""
    rng = random.Random(6)
    a = rand_ids(rng, 40)  # 10 full blocks
    e = rand_ids(rng, 64)  # + 4 tokens -> 67 computed = 17 blocks
    params = SamplingParams(**GREEDY, max_tokens=4, ignore_eos=True)

    engine = make_engine(tiny_checkpoint, blocks=24, block_size=4, max_num_batched_tokens=128)
    plain = make_engine(tiny_checkpoint, blocks=24, block_size=4, max_num_batched_tokens=128, prefix_caching=False)
    # `a` leaves 10 cached blocks and 1 partial one; 13 blocks were never used. `e` takes
    # those 14 uncached blocks, then must evict 3 of `a`'s: the 3 last of its prompt.
    run(engine, {"a": (a, params)})
    run(engine, {"e": (e, params)})
    again = run(engine, {"a-again": (a + [99], params)})["a-again"]
    assert again.num_cached_tokens == 28
    want = run(plain, {"a-again": (a + [99], params)})["a-again"]
    assert again.choices[0].token_ids == want.choices[0].token_ids

    # Churn the pool until nothing of `a` survives; results stay right.
    for i in range(3):
        run(engine, {f"churn{i}": (rand_ids(rng, 60), params)})
    final = run(engine, {"a-final": (a, params)})["a-final"]
    assert final.num_cached_tokens == 0
    assert final.choices[0].token_ids == run(plain, {"a-final": (a, params)})["a-final"].choices[0].token_ids
    assert_idle(engine)


