"""The block pool (`engine.kv_cache.BlockManager`) on its own: reference counts, sharing,
free order, LRU eviction, admission without side effects and hashing. No model.
"""

from __future__ import annotations

import pytest

import engine.kv_cache as kv_cache
from engine.kv_cache import BlockManager
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

# ---------------------------------------------------------------------------------------
# BlockManager unit tests


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


