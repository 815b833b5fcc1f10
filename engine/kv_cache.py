"""KV block pool: reference counts, per-sequence allocation and prefix caching.

A full block is named by a chained hash of (parent block's hash, its tokens), so one hash
names a whole prefix. Freed blocks keep their contents and hash until they are reused:
freed cached blocks form an LRU, and a later request with the same prefix takes them back.
A hash hit is only trusted once the block's own tokens and the block it was computed after
are checked, so even colliding hashes never hand out K/V computed under another prefix.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

from engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    tokens: tuple[int, ...] = ()  # kept to verify a hash hit token by token
    # Each allocation gets a fresh, never reused fill id. A cached block records the chain id of
    # the block before it when its K/V were computed: with the tokens, that pins down the whole
    # prefix by induction, which the hash (64-bit, unkeyed for ints) alone cannot. A block's chain id
    # is its fill id, or, when two requests prefilled the same prefix at once, the fill id of the
    # copy the cache names (checked equal: same tokens after the same chain), so the blocks that
    # followed either copy are found.
    fill_id: int = -1
    chain_id: int = -1
    parent_fill: int | None = None
    root: str | None = None  # the adapter its K/V were computed under (None: the base model)


def chain_hash(parent: int | str | None, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks nobody references, oldest first: uncached ones at the front (taken first),
        # freed cached ones at the back (evicted least-recently-used, O(1) each).
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # chain hash -> block id
        self._fill_ids = itertools.count()
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @staticmethod
    def _root(seq: Sequence) -> str | None:
        """What a prefix's chain starts from: K/V differ under each adapter, so each has its own chains."""
        return None if seq.lora is None else seq.lora.key

    def _block_hashes(self, seq: Sequence, num_blocks: int) -> list[tuple[int, tuple[int, ...]]]:
        out: list[tuple[int, tuple[int, ...]]] = []
        parent: int | str | None = self._root(seq)
        for b in range(num_blocks):
            tokens = tuple(seq.token_ids[b * self.block_size : (b + 1) * self.block_size])
            parent = chain_hash(parent, tokens)
            out.append((parent, tokens))
        return out

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks that hold a prefix of `seq`; at least one token is left to compute."""
        if not self.enable_prefix_caching:
            return []
        full = (seq.num_tokens - 1) // self.block_size
        hits: list[int] = []
        parent_fill: int | None = None
        root = self._root(seq)
        for h, tokens in self._block_hashes(seq, full):
            block_id = self.cached.get(h)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.tokens != tokens or block.parent_fill != parent_fill or block.root != root:
                break
            hits.append(block_id)
            parent_fill = block.chain_id
        return hits

    def admit(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Give a waiting sequence its prefix-cache hits plus blocks for its first chunk.

        The caller has capped `num_new_tokens` to what remains after the hits (see
        `match_prefix`). Returns False, changing nothing, when the pool is too small.
        """
        hits = self.match_prefix(seq)
        hit_tokens = len(hits) * self.block_size
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        new = self.blocks_needed(hit_tokens + num_new_tokens) - len(hits)
        if new + revived > self.num_free_blocks:
            return False
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
        seq.block_table = list(hits)
        seq.num_computed_tokens = hit_tokens
        seq.num_cached_prompt_tokens = hit_tokens
        self.prefix_queries += seq.num_prompt_tokens
        self.prefix_hits += min(hit_tokens, seq.num_prompt_tokens)
        self._append_blocks(seq, new)
        return True

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return need <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow a running sequence's block table to hold `num_new_tokens` more tokens."""
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if need > self.num_free_blocks:
            raise RuntimeError("append_slots called without can_append")
        self._append_blocks(seq, need)

    def _append_blocks(self, seq: Sequence, count: int) -> None:
        for _ in range(count):
            block_id, _ = self.free.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None:  # evict: its old contents are about to be overwritten
                if self.cached.get(block.hash) == block_id:
                    del self.cached[block.hash]
                block.hash, block.tokens, block.parent_fill = None, (), None
            block.ref_count = 1
            block.fill_id = block.chain_id = next(self._fill_ids)
            seq.block_table.append(block_id)

    def cache_full_blocks(self, seq: Sequence, num_computed_before: int) -> None:
        """Register blocks that this step's computation filled, so later requests can reuse them."""
        if not self.enable_prefix_caching:
            return
        first = num_computed_before // self.block_size
        last = seq.num_computed_tokens // self.block_size
        if last <= first:
            return
        parent = self.blocks[seq.block_table[first - 1]].hash if first else self._root(seq)
        for b in range(first, last):
            tokens = tuple(seq.token_ids[b * self.block_size : (b + 1) * self.block_size])
            parent = chain_hash(parent, tokens)
            block = self.blocks[seq.block_table[b]]
            if block.hash is None:
                block.hash, block.tokens, block.root = parent, tokens, self._root(seq)
                block.parent_fill = self.blocks[seq.block_table[b - 1]].chain_id if b else None
                named = self.blocks[self.cached.setdefault(parent, block.block_id)]
                if named is not block and (named.tokens, named.parent_fill, named.root) == (
                        block.tokens, block.parent_fill, block.root):
                    block.chain_id = named.chain_id  # a twin of the named copy: its followers chain on

    def free_seq(self, seq: Sequence) -> None:
        # Tail blocks first, so a shared prefix outlives its tails in the LRU.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
                if block.hash is None:
                    self.free.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.num_computed_tokens = 0
