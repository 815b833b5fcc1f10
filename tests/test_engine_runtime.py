"""Engine runtime tests: paged-cache consistency, batch invariance under chunked prefill,
preemption, prefix caching (and the BlockManager beneath it), n > 1, seeds, stop handling,
up-front rejection, livelock freedom and the priority policy.

Everything runs the `tiny` random-weight Mixtral in fp32 on CPU with small prompts.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import engine.kv_cache as kv_cache
from engine.checkpoint import PRESETS
from engine.config import EngineConfig
from engine.kv_cache import BlockManager
from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.model_runner import StepOutput, kv_bytes_per_block
from engine.outputs import RequestError
from engine.sampling import SamplingParams
from engine.scheduler import ScheduledSeq
from engine.sequence import Sequence, TokenLogprob

TINY = PRESETS["tiny"]
GREEDY = dict(temperature=0.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint: Path) -> Path:
    return tiny_checkpoint


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


# ---------------------------------------------------------------------------------------
# 1. Paged-cache consistency


@pytest.mark.parametrize(("block_size", "budget"), [(4, 16), (16, 512)])
def test_cached_logprobs_match_fresh_full_prefill(ckpt: Path, block_size: int, budget: int) -> None:
    """Each generated token's logprob (and its top-20) equals a fresh, uncached full prefill of
    prompt + tokens so far: the K/V written block by block (chunked prefill, batched decodes
    crossing many block boundaries) are the K/V a single pass computes."""
    rng = random.Random(1)
    engine = make_engine(ckpt, block_size=block_size, max_num_batched_tokens=budget)
    prompts = [rand_ids(rng, n) for n in (5, 37, 90)]
    requests = {
        f"r{i}": (p, SamplingParams(temperature=0.0 if i == 0 else 1.0, seed=i, max_tokens=12, logprobs=20,
                                 ignore_eos=True))
        for i, p in enumerate(prompts)
    }
    got = run(engine, requests)

    # The reference: every prefix as its own request on an engine without prefix caching, one
    # block per sequence and no chunking, so each is a single plain causal pass.
    ref_engine = make_engine(ckpt, block_size=256, blocks=64, max_num_batched_tokens=4096, prefix_caching=False)
    ref_requests: Requests = {}
    for rid, (prompt, _) in requests.items():
        out = got[rid].choices[0].token_ids
        for i in range(len(out)):
            ref_requests[f"{rid}-{i}"] = (prompt + out[:i], SamplingParams(**GREEDY, max_tokens=1, logprobs=20))
    ref = run(ref_engine, ref_requests)

    compared = 0
    for rid in requests:
        choice = got[rid].choices[0]
        assert len(choice.token_ids) == 12 and len(choice.logprobs) == 12
        for i, (token, lp) in enumerate(zip(choice.token_ids, choice.logprobs)):
            want = ref[f"{rid}-{i}"].choices[0].logprobs[0].top
            # Values position by position, and ids wherever both lists have them (a near-tie
            # at the cut-off may swap which token is 20th).
            assert [v for _, v in lp.top] == pytest.approx([v for _, v in want], abs=1e-4), (rid, i)
            common = dict(lp.top).keys() & dict(want).keys()
            assert len(common) >= 18, (rid, i)
            assert [dict(lp.top)[t] for t in common] == pytest.approx([dict(want)[t] for t in common], abs=1e-4)
            want_lp = dict(want).get(token)
            if want_lp is not None:
                assert lp.logprob == pytest.approx(want_lp, abs=1e-4), (rid, i)
                compared += 1
    # Greedy tokens are always in the top 20, and so are most sampled ones.
    assert compared >= 24, compared


# ---------------------------------------------------------------------------------------
# 2. Batch invariance under chunked prefill


def test_batched_chunked_greedy_equals_alone(ckpt: Path) -> None:
    rng = random.Random(2)
    lengths = [1, 2, 150, 3, 97, 64, 65, 4, 128, 17] + [rng.randint(1, 150) for _ in range(22)]
    prompts = [rand_ids(rng, n) for n in lengths]
    params = SamplingParams(**GREEDY, max_tokens=6, ignore_eos=True)

    engine = make_engine(ckpt, block_size=4, max_num_seqs=32, max_num_batched_tokens=64)
    steps: list[list[tuple[int, int]]] = []  # per step: (num_computed_tokens, num_new_tokens) per item
    execute = engine.runner.execute

    def recording_execute(batch: list[ScheduledSeq]) -> StepOutput:
        steps.append([(s.seq.num_computed_tokens, s.num_new_tokens) for s in batch])
        return execute(batch)

    engine.runner.execute = recording_execute  # type: ignore[method-assign]
    batched = run(engine, {f"p{i}": (p, params) for i, p in enumerate(prompts)})
    assert_idle(engine)

    # The run really did what this test claims: prompts split over several steps, and steps
    # mixing decodes with prefill chunks.
    assert any(c > 0 and n > 1 for items in steps for c, n in items), "no prompt was chunked"
    assert any(
        any(c > 0 and n == 1 for c, n in items) and any(n > 1 for _, n in items) for items in steps
    ), "no step mixed decodes with a prefill chunk"

    alone_engine = make_engine(ckpt, block_size=16, max_num_batched_tokens=512, prefix_caching=False)
    for i, prompt in enumerate(prompts):
        alone = run(alone_engine, {f"alone{i}": (prompt, params)})[f"alone{i}"]
        assert batched[f"p{i}"].choices[0].token_ids == alone.choices[0].token_ids, f"prompt {i} (len {len(prompt)})"


# ---------------------------------------------------------------------------------------
# 3. Preemption


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_preemption_recomputes_exactly(ckpt: Path, prefix_caching: bool) -> None:
    rng = random.Random(3)
    requests: Requests = {}
    for i in range(12):
        # Half greedy, half seeded sampling: a seeded row's generator must survive recompute.
        sp = SamplingParams(**GREEDY) if i % 2 else SamplingParams(temperature=1.0, seed=100 + i)
        sp = sp.model_copy(update={"max_tokens": 16, "ignore_eos": True})
        requests[f"r{i}"] = (rand_ids(rng, rng.randint(8, 40)), sp)

    big = make_engine(ckpt, blocks=1024, max_num_batched_tokens=128, prefix_caching=prefix_caching)
    want = run(big, requests)
    assert big.stats().num_preemptions == 0

    # 40 blocks of 4 tokens: any one request fits (<= 14 blocks), all twelve at once do not.
    small = make_engine(ckpt, blocks=40, max_num_batched_tokens=128, prefix_caching=prefix_caching)
    got = run(small, requests)
    assert small.stats().num_preemptions > 0
    for rid in requests:
        assert got[rid].choices[0].token_ids == want[rid].choices[0].token_ids, rid
        assert got[rid].choices[0].finish_reason == "length"
    assert_idle(small)


def test_unbounded_request_stops_at_pool_capacity(ckpt: Path) -> None:
    """`max_tokens=None` on a pool smaller than the context: the request must end ("length")
    once it fills the pool, not preempt itself forever."""
    engine = make_engine(ckpt, blocks=16, block_size=4, max_num_batched_tokens=64)
    params = SamplingParams(**GREEDY, max_tokens=None, ignore_eos=True)
    res = run(engine, {"r": ([5, 6, 7, 8, 9, 10, 11, 12, 13, 14], params)})
    choice = res["r"].choices[0]
    assert choice.finish_reason == "length"
    assert 10 + len(choice.token_ids) == engine.kv_capacity_tokens == 64
    assert_idle(engine)


# ---------------------------------------------------------------------------------------
# 4. Prefix caching through the engine


def test_prefix_cache_reuses_shared_prefix(ckpt: Path) -> None:
    rng = random.Random(4)
    prefix = rand_ids(rng, 40)  # 10 full blocks of 4
    a = prefix + rand_ids(rng, 5)
    b = prefix + rand_ids(rng, 7)
    exact = prefix  # a prompt that is all full blocks: the last one is recomputed
    params = SamplingParams(**GREEDY, max_tokens=8, logprobs=5, ignore_eos=True)

    engine = make_engine(ckpt, block_size=4)
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

    plain = make_engine(ckpt, block_size=4, prefix_caching=False)
    for rid, prompt in (("a", a), ("b", b), ("exact", exact), ("exact-again", exact)):
        want = run(plain, {rid: (prompt, params)})[rid]
        assert want.num_cached_tokens == 0
        assert got[rid].choices[0].token_ids == want.choices[0].token_ids, rid
        for x, y in zip(got[rid].choices[0].logprobs, want.choices[0].logprobs):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4), rid
    assert plain.stats().prefix_cache_hits == 0


@pytest.mark.parametrize(
    "colliding_hash",
    [lambda parent, tokens: hash(tokens), lambda parent, tokens: 0],
    ids=["ignores-parent", "constant"],
)
def test_prefix_cache_hit_is_verified(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch, colliding_hash: Callable[[int | None, tuple[int, ...]], int]
) -> None:
    """With a hash that collides, a hit must still only hand out K/V computed under the
    same tokens *and* the same preceding blocks: block T after P is not block T after Q."""
    monkeypatch.setattr(kv_cache, "chain_hash", colliding_hash)
    rng = random.Random(5)
    p, q, t = rand_ids(rng, 8), rand_ids(rng, 8), rand_ids(rng, 8)
    prompts = {"a": p + t + [11], "c": q + t + [12], "b": q + t + [13, 14], "t": t + t + t + [15]}
    params = SamplingParams(**GREEDY, max_tokens=6, logprobs=0, ignore_eos=True)

    engine = make_engine(ckpt, block_size=4)
    plain = make_engine(ckpt, block_size=4, prefix_caching=False)
    for rid, prompt in prompts.items():  # one at a time, so each sees the others' cached blocks
        got = run(engine, {rid: (prompt, params)})[rid].choices[0]
        want = run(plain, {rid: (prompt, params)})[rid].choices[0]
        assert got.token_ids == want.token_ids, rid
        assert [x.logprob for x in got.logprobs] == pytest.approx([x.logprob for x in want.logprobs], abs=1e-4), rid
    assert_idle(engine)


def test_prefix_cache_lru_eviction(ckpt: Path) -> None:
    """Freed cached blocks are evicted least recently used first, tail before prefix."""
    rng = random.Random(6)
    a = rand_ids(rng, 40)  # 10 full blocks
    e = rand_ids(rng, 64)  # + 4 tokens -> 67 computed = 17 blocks
    params = SamplingParams(**GREEDY, max_tokens=4, ignore_eos=True)

    engine = make_engine(ckpt, blocks=24, block_size=4, max_num_batched_tokens=128)
    plain = make_engine(ckpt, blocks=24, block_size=4, max_num_batched_tokens=128, prefix_caching=False)
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


# ---------------------------------------------------------------------------------------
# 4b. BlockManager unit tests


def _seq(tokens: list[int]) -> Sequence:
    return Sequence(
        request_id="x", index=0, token_ids=list(tokens), num_prompt_tokens=len(tokens),
        params=SamplingParams(), detokenizer=None, generator=None,  # type: ignore[arg-type]
    )


def _compute_all(bm: BlockManager, seq: Sequence) -> None:
    """Admit `seq` and pretend its whole prompt was computed (as one engine step would)."""
    hits = len(bm.match_prefix(seq)) * bm.block_size
    assert bm.admit(seq, seq.num_tokens - hits)
    before = seq.num_computed_tokens
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq, before)


def _snapshot(bm: BlockManager) -> tuple:
    return (
        list(bm.free), dict(bm.cached), [(b.ref_count, b.hash, b.tokens) for b in bm.blocks],
        bm.prefix_queries, bm.prefix_hits,
    )


def test_block_manager_ref_counts_and_sharing() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = _seq(list(range(10, 23)))  # 13 tokens: 3 full blocks + 1
    _compute_all(bm, a)
    assert len(a.block_table) == 4 and bm.num_used_blocks == 4
    b = _seq(list(range(10, 22)) + [99, 98])  # same 3 full blocks, then its own
    assert bm.match_prefix(b) == a.block_table[:3]
    _compute_all(bm, b)
    assert b.block_table[:3] == a.block_table[:3] and b.block_table[3] != a.block_table[3]
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 2, 1]
    assert b.num_cached_prompt_tokens == 12 and bm.prefix_hits == 12 and bm.prefix_queries == 27
    assert bm.num_used_blocks == 5

    bm.free_seq(a)
    assert [bm.blocks[i].ref_count for i in b.block_table] == [1, 1, 1, 1]
    assert bm.num_used_blocks == 4 and a.block_table == [] and a.num_computed_tokens == 0
    bm.free_seq(b)
    assert bm.num_used_blocks == 0 and all(blk.ref_count == 0 for blk in bm.blocks)


def test_block_manager_free_order_and_lru_eviction() -> None:
    bm = BlockManager(num_blocks=6, block_size=2)
    a = _seq([1, 2, 3, 4, 5, 6, 7])  # 3 full blocks + 1 partial
    _compute_all(bm, a)
    full, partial = a.block_table[:3], a.block_table[3]
    bm.free_seq(a)
    # Uncached blocks first (taken first), then cached ones oldest-first with the tail oldest,
    # so a shared prefix outlives its tails.
    assert list(bm.free) == [partial, 4, 5, full[2], full[1], full[0]]
    assert bm.num_free_blocks == 6

    b = _seq([50, 51, 52, 53, 54, 55, 56, 57])  # needs 4 blocks: 3 uncached + evict a's tail
    assert bm.admit(b, 8)
    assert full[2] in b.block_table and full[1] not in b.block_table
    assert bm.blocks[full[2]].hash is None and full[2] not in bm.cached.values()
    # `a`'s first two blocks are still there; its third is gone.
    assert bm.match_prefix(_seq([1, 2, 3, 4, 5, 6, 7])) == full[:2]


def test_block_manager_admit_fails_without_side_effects() -> None:
    bm = BlockManager(num_blocks=5, block_size=4)
    a = _seq(list(range(100, 113)))  # 3 full blocks + 1
    _compute_all(bm, a)
    bm.free_seq(a)
    running = _seq(list(range(200, 204)))
    _compute_all(bm, running)  # holds one block: 4 free, 3 of them cached for `a`'s prefix

    # Hits revive 3 free cached blocks and 2 more are needed: 5 > 4 free.
    b = _seq(list(range(100, 112)) + list(range(300, 305)))
    assert len(bm.match_prefix(b)) == 3
    before = _snapshot(bm)
    assert not bm.admit(b, 5)
    assert _snapshot(bm) == before
    assert b.block_table == [] and b.num_computed_tokens == 0 and b.num_cached_prompt_tokens == 0
    # The same request fits once the other sequence is gone, and still gets its hits.
    bm.free_seq(running)
    assert bm.admit(b, 5) and b.num_computed_tokens == 12

    assert not bm.can_append(b, 100)
    with pytest.raises(RuntimeError):
        bm.append_slots(b, 100)
    assert len(b.block_table) == 5


def test_block_manager_hit_needs_same_tokens_and_same_parent(monkeypatch: pytest.MonkeyPatch) -> None:
    # A hash that ignores the parent: block T hashes the same after P as after Q.
    monkeypatch.setattr(kv_cache, "chain_hash", lambda parent, tokens: hash(tokens))
    bm = BlockManager(num_blocks=8, block_size=2)
    a = _seq([1, 2, 7, 8])  # P, T
    _compute_all(bm, a)
    c = _seq([3, 4, 7, 8])  # Q, T: T's hash already names `a`'s block
    _compute_all(bm, c)
    assert bm.match_prefix(_seq([1, 2, 7, 8, 9])) == a.block_table[:2]
    assert bm.match_prefix(_seq([3, 4, 7, 8, 9])) == c.block_table[:1]  # `a`'s T was computed after P
    assert bm.match_prefix(_seq([7, 8, 7, 8, 9])) == []  # nor is it a first block

    monkeypatch.setattr(kv_cache, "chain_hash", lambda parent, tokens: 0)
    bm = BlockManager(num_blocks=4, block_size=2)
    _compute_all(bm, _seq([1, 2, 3]))
    assert bm.match_prefix(_seq([5, 6, 1])) == []  # same hash, other tokens


def test_block_manager_prefix_caching_disabled() -> None:
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    a = _seq([1, 2, 3, 4, 5])
    _compute_all(bm, a)
    bm.free_seq(a)
    assert bm.match_prefix(_seq([1, 2, 3, 4, 5])) == [] and bm.cached == {}
    with pytest.raises(ValueError, match="at least one block"):
        BlockManager(num_blocks=0, block_size=2)


# ---------------------------------------------------------------------------------------
# 5. n > 1


def test_n_choices_share_prompt_and_reproduce(ckpt: Path) -> None:
    rng = random.Random(7)
    prompt = rand_ids(rng, 37)  # 9 full blocks of 4 (36 tokens) + 1
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=8, ignore_eos=True)

    engine = make_engine(ckpt, block_size=4, max_num_batched_tokens=16)
    before = engine.stats()
    first = run(engine, {"n3": (prompt, params)})["n3"]
    after = engine.stats()
    # The first choice computes the prompt; the other two reuse its 9 full blocks.
    assert after.prefix_cache_hits - before.prefix_cache_hits == 2 * 36
    assert after.prompt_tokens_total - before.prompt_tokens_total == 37 + 2 * 1
    assert [len(c.token_ids) for c in first.choices] == [8, 8, 8]
    seqs = [tuple(c.token_ids) for c in first.choices]
    assert len(set(seqs)) == 3, "choices at temperature 1 should differ"
    assert_idle(engine)

    fresh = make_engine(ckpt, block_size=4, max_num_batched_tokens=16)
    again = run(fresh, {"n3": (prompt, params)})["n3"]
    assert [tuple(c.token_ids) for c in again.choices] == seqs
    # Same engine (prompt now cached) and alongside another request: still the same.
    noise = (rand_ids(rng, 20), SamplingParams(temperature=1.0, max_tokens=8))
    mixed = run(engine, {"noise": noise, "n3-again": (prompt, params)})["n3-again"]
    assert [tuple(c.token_ids) for c in mixed.choices] == seqs


# ---------------------------------------------------------------------------------------
# 6. Seeds across batch compositions


def test_seed_reproduces_across_batch_compositions(ckpt: Path) -> None:
    rng = random.Random(8)
    target = rand_ids(rng, 23)
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=10, ignore_eos=True)

    alone = run(make_engine(ckpt, max_num_batched_tokens=32), {"t": (target, params)})["t"].choices[0].token_ids
    for layout in range(2):
        others: Requests = {
            f"o{i}": (rand_ids(rng, rng.randint(1, 60)), SamplingParams(temperature=1.0, max_tokens=rng.randint(2, 12)))
            for i in range(6)
        }
        items = list(others.items())
        items.insert(3 if layout else 0, ("t", (target, params)))
        got = run(make_engine(ckpt, max_num_batched_tokens=32), dict(items))
        assert got["t"].choices[0].token_ids == alone, f"layout {layout}"
    # ... and differs with another seed, so the check above is not vacuous.
    other = run(make_engine(ckpt), {"t": (target, params.model_copy(update={"seed": 4321}))})
    assert other["t"].choices[0].token_ids != alone


# ---------------------------------------------------------------------------------------
# 7. Stop handling


GreedyRun = tuple[list[int], list[int], list[str]]


@pytest.fixture(scope="module")
def greedy_reference(ckpt: Path) -> GreedyRun:
    """(prompt, greedy tokens, per-token text deltas) of one 24-token greedy run."""
    prompt = rand_ids(random.Random(9), 12)
    res = run(make_engine(ckpt), {"g": (prompt, SamplingParams(**GREEDY, max_tokens=24, ignore_eos=True))})
    choice = res["g"].choices[0]
    assert len(choice.deltas) == 24 and "".join(choice.deltas) == choice.text
    return prompt, choice.token_ids, choice.deltas


def _spanning_stop(deltas: list[str]) -> tuple[int, str]:
    """A 5-character stop string made of the end of token i and the start of token i + 1,
    whose first occurrence in the text is there."""
    text = "".join(deltas)
    offset = 0
    for i in range(len(deltas) - 8):  # leaves room for the min_tokens test to run past it
        offset += len(deltas[i])
        if i >= 2 and len(deltas[i]) >= 3 and len(deltas[i + 1]) >= 2:
            stop = deltas[i][-3:] + deltas[i + 1][:2]
            if text.find(stop) == offset - 3:
                return i, stop
    raise AssertionError(f"no token pair to build a spanning stop string from: {deltas}")


def test_stop_string_spanning_tokens(ckpt: Path, greedy_reference: GreedyRun) -> None:
    prompt, tokens, deltas = greedy_reference
    i, stop = _spanning_stop(deltas)
    full = "".join(deltas)
    cut = full.find(stop)
    engine = make_engine(ckpt)
    params = SamplingParams(**GREEDY, max_tokens=24, ignore_eos=True, stop=["no such text", stop])
    choice = run(engine, {"s": (prompt, params)})["s"].choices[0]
    assert choice.finish_reason == "stop" and choice.stop_reason == stop
    assert choice.token_ids == tokens[: i + 2]  # stopped on the token completing the string
    assert choice.text == full[:cut] and stop not in choice.text
    # The stream equals the final text, and no prefix of it ever ran past the cut.
    assert "".join(choice.deltas) == choice.text
    streamed = ""
    for piece in choice.deltas:
        streamed += piece
        assert choice.text.startswith(streamed)
    assert_idle(engine)


def test_stop_token_ids_and_length(ckpt: Path, greedy_reference: GreedyRun) -> None:
    prompt, tokens, deltas = greedy_reference
    j = next(k for k in range(3, len(tokens)) if tokens[k] not in tokens[:k])
    engine = make_engine(ckpt)
    res = run(engine, {
        "stop-id": (prompt, SamplingParams(**GREEDY, max_tokens=24, ignore_eos=True, stop_token_ids=[tokens[j]])),
        "length": (prompt, SamplingParams(**GREEDY, max_tokens=5, ignore_eos=True)),
    })
    stop_id = res["stop-id"].choices[0]
    assert stop_id.finish_reason == "stop" and stop_id.stop_reason == tokens[j]
    assert stop_id.token_ids == tokens[: j + 1]  # the stop token is returned, not its text
    assert stop_id.text == "".join(deltas[:j])
    length = res["length"].choices[0]
    assert length.finish_reason == "length" and length.stop_reason is None
    assert length.token_ids == tokens[:5] and length.text == "".join(deltas[:5])
    assert_idle(engine)


def test_min_tokens_defers_stops(ckpt: Path, greedy_reference: GreedyRun) -> None:
    prompt, tokens, deltas = greedy_reference
    i, stop = _spanning_stop(deltas)
    j = next(k for k in range(3, len(tokens)) if tokens[k] not in tokens[:k])
    engine = make_engine(ckpt)
    res = run(engine, {
        # The stop string completes at token i + 1, before min_tokens: it must not end the request.
        "string": (prompt, SamplingParams(**GREEDY, max_tokens=i + 6, min_tokens=i + 4, ignore_eos=True, stop=[stop])),
        # The stop token cannot even be sampled before min_tokens.
        "token": (prompt, SamplingParams(**GREEDY, max_tokens=j + 4, min_tokens=j + 2, ignore_eos=True,
                                         stop_token_ids=[tokens[j]])),
    })
    string = res["string"].choices[0]
    assert len(string.token_ids) >= i + 4
    assert string.token_ids == tokens[: len(string.token_ids)]
    token = res["token"].choices[0]
    assert len(token.token_ids) >= j + 2
    assert token.token_ids[:j] == tokens[:j] and token.token_ids[j] != tokens[j]
    assert tokens[j] not in token.token_ids[: j + 2]
    assert_idle(engine)


# ---------------------------------------------------------------------------------------
# 8. Up-front rejection


def test_too_long_requests_rejected_up_front(ckpt: Path) -> None:
    engine = make_engine(ckpt, blocks=32, block_size=4, max_model_len=64)  # pool: 128 tokens
    too_long = r"maximum context length is 64 tokens.*65 tokens \(64 in the prompt, 1 in the completion\)"
    with pytest.raises(RequestError, match=too_long) as err:
        engine.add_request("long-prompt", list(range(3, 67)), SamplingParams(max_tokens=1))
    assert err.value.param == "prompt"
    too_long = r"length is 64 tokens.*70 tokens \(60 in the prompt, 10 in the completion\)"
    with pytest.raises(RequestError, match=too_long) as err:
        engine.add_request("long-total", list(range(3, 63)), SamplingParams(max_tokens=10))
    assert err.value.param == "max_tokens"
    assert_idle(engine)

    pool = make_engine(ckpt, blocks=32, block_size=4)  # model context 4096, pool 128 tokens
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


def test_offline_generate_with_a_rejected_prompt_leaks_nothing(ckpt: Path) -> None:
    """`LLM.generate([ok, too_long])` raises; the accepted prompt must not stay queued and
    break (or run inside) the next call."""
    llm = LLM(model=str(ckpt), dtype="float32", max_model_len=64, load_progress=False,
              cache={"kv_cache_bytes": 64 * kv_bytes_per_block(TINY, TINY.num_key_value_heads, 4, torch.float32), "block_size": 4})
    params = SamplingParams(**GREEDY, max_tokens=4)
    with pytest.raises(RequestError):
        llm.generate([[5, 6, 7], list(range(3, 80))], params)
    assert not llm.engine.has_unfinished, "the accepted prompt of a rejected batch is left queued"
    out = llm.generate([[5, 6, 7]], params)
    assert len(out) == 1 and len(out[0].token_ids) == 4


# ---------------------------------------------------------------------------------------
# 10. Priority policy


def _finish_order(ckpt: Path, policy: str) -> tuple[list[str], LLMEngine]:
    engine = make_engine(ckpt, policy=policy, max_num_seqs=1, max_num_batched_tokens=64)
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


def test_priority_policy_schedules_urgent_request_first(ckpt: Path) -> None:
    order, engine = _finish_order(ckpt, "priority")
    assert order == ["a", "urgent", "b", "c"]
    assert_idle(engine)
    fcfs, _ = _finish_order(ckpt, "fcfs")
    assert fcfs == ["a", "b", "c", "urgent"]


def test_priority_policy_keeps_waiting_queue_ordered_after_preemption(ckpt: Path) -> None:
    """A preempted low-priority sequence must not jump ahead of a more urgent waiting one."""
    engine = make_engine(ckpt, blocks=12, block_size=4, policy="priority", max_num_seqs=2)
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
