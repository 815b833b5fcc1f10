"""Prefix affinity: which model replica most likely holds a request's longest cached prefix.

An approximate index of what was routed where, kept by each router (no tokenizer, no call to the
replicas): a request's text (its prompt, or its conversation serialised so that a later turn
extends an earlier one) is cut into fixed-size blocks of characters, each named by a chained hash
rooted at the request's adapter (KV blocks are never shared across adapters, so neither are
these); the index maps each block hash to the replicas it was sent to, least recently used
evicted first. The decision then balances affinity against load: the replica with the most
matching blocks (on a tie, the less loaded) wins unless it carries more than
max(`imbalance_threshold`, `imbalance_ratio` x the mean load) requests beyond the least loaded one,
which then takes the request instead.

NOTE: the allowance grows with the load so that, busy, a conversation keeps its replica through
ordinary fluctuations, yet stays small when few requests run: a prefix every request shares (a
system prompt) must not herd a tier's first requests onto one replica. Once the least loaded
replica has taken one of them, both hold that prefix and it no longer decides.

Pure Python, no Ray: `deployments.prefix_router` plugs it into Serve's request-router API, and
tests check its decisions directly.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from deployments.protocol import GenerateRequest

DecisionKind = Literal["affinity", "imbalanced", "no_match"]


def request_text(request: GenerateRequest) -> str:
    """What the replica's prompt starts with, as text: a conversation's messages in order, each closed
    by a separator, so the next turn of the same conversation extends this one's text."""
    if request.messages is None:
        prompt = request.prompt
        return prompt if isinstance(prompt, str) else ",".join(map(str, prompt or []))
    head = "" if request.tools is None else json.dumps(request.tools.tools, sort_keys=True) + "\x1e"
    return head + "".join(f"{m.get('role')}\x1f{json.dumps(m.get('content'))}"
                          f"{json.dumps(m['tool_calls']) if m.get('tool_calls') else ''}\x1e" for m in request.messages)


def block_hashes(text: str, block_chars: int, root: str | None) -> list[int]:
    """Chained hashes of the text's whole blocks (a hash names its block and everything before it)."""
    hashes: list[int] = []
    parent: int | str | None = root
    for start in range(0, len(text) - block_chars + 1, block_chars):
        parent = hash((parent, text[start : start + block_chars]))
        hashes.append(parent)
    return hashes


class PrefixIndex:
    """Block hash -> the replicas requests with that prefix went to, bounded (LRU)."""

    def __init__(self, max_blocks: int = 200_000) -> None:
        self.max_blocks = max_blocks
        self._holders: OrderedDict[int, set[str]] = OrderedDict()

    def match(self, hashes: list[int], replicas: Iterable[str]) -> dict[str, int]:
        """For each replica, how many leading blocks of `hashes` were sent to it."""
        matched = dict.fromkeys(replicas, 0)
        alive = set(matched)
        for depth, h in enumerate(hashes, start=1):
            holders = self._holders.get(h)
            alive &= holders or set()
            if not alive:
                break
            self._holders.move_to_end(h)
            for replica in alive:
                matched[replica] = depth
        return matched

    def record(self, hashes: list[int], replica: str) -> None:
        for h in hashes:
            self._holders.setdefault(h, set()).add(replica)
            self._holders.move_to_end(h)
        while len(self._holders) > self.max_blocks:
            self._holders.popitem(last=False)

    def forget(self, replica: str) -> None:
        """A replica that left (scaled down, died): nothing routes to it by affinity any more."""
        for h in [h for h, holders in self._holders.items() if replica in holders]:
            holders = self._holders[h]
            holders.discard(replica)
            if not holders:
                del self._holders[h]

    def __len__(self) -> int:
        return len(self._holders)


@dataclass(frozen=True)
class Decision:
    replica: str
    kind: DecisionKind
    matched_blocks: int


def choose(index: PrefixIndex, hashes: list[int], loads: Mapping[str, float], imbalance_threshold: float,
           imbalance_ratio: float = 0.0) -> Decision:
    """The replica for a request with these block `hashes`, given each candidate's load (requests in
    flight). Ties go to the less loaded replica, then to the first listed."""
    least = min(loads, key=lambda r: loads[r])
    matched = index.match(hashes, loads)
    best = max(loads, key=lambda r: (matched[r], -loads[r]))
    if matched[best] == 0:
        return Decision(least, "no_match", 0)
    allowance = max(imbalance_threshold, imbalance_ratio * sum(loads.values()) / len(loads))
    if loads[best] - loads[least] > allowance:
        return Decision(least, "imbalanced", matched[least])
    return Decision(best, "affinity", matched[best])
