"""A tier's request router (Serve 2.60's request-router API): prefix affinity balanced against load.

It runs inside each process that holds a handle to the tier (our router ingress), so every router
replica keeps its own index of where it sent what (deployments/prefix_routing.py). Load is the
requests this router has in flight on each replica, counted as it routes them and as they complete.

NOTE: not Serve's queue-length cache: it learns of a request only once it is sent, so a burst of
requests routed together all saw the same stale loads and piled onto one replica.

A request with a LoRA adapter first narrows the candidates to the replicas holding that adapter
(Serve's model multiplexing), then prefers the prefix among them. Replicas that autoscaling adds
start with no affinity; those that leave are dropped from the index.

NOTE: why Serve's router API rather than our own layer in the ingress: Serve already tracks the
replica set, their queue lengths, rejection and retries; the policy is the only new part.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import Counter
from typing import Any

from ray.serve.request_router import (
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from deployments import metrics as m
from deployments.prefix_routing import PrefixIndex, block_hashes, choose, request_text
from deployments.protocol import GenerateRequest


# NOTE: no FIFOMixin: it hands a chosen replica to the oldest waiting request, not to the one it
# was chosen for. Nor the base class's match by internal request id: the calls one HTTP request fans
# out (a batch of prompts) share that id and Serve indexes only the first, so the others never got a
# replica. Each routing task hands its replica to the very request it chose for.
class PrefixAffinityRouter(MultiplexMixin, RequestRouter):
    @property
    def max_num_routing_tasks(self) -> int:
        # NOTE: without FIFOMixin each routing task fulfils only its own request, so Serve's default of
        # two tasks per replica made a burst of requests wait in line to be routed (16 streams on one
        # replica: TTFT p50 418 against 207 ms); a task per waiting request, up to Serve's cap.
        return self.max_num_routing_tasks_cap if self._replicas else 0

    def initialize_state(self, block_chars: int = 256, imbalance_threshold: float = 2.0,
                         imbalance_ratio: float = 0.5, max_blocks: int = 200_000, **_: Any) -> None:
        self.block_chars = block_chars
        self.imbalance_threshold, self.imbalance_ratio = imbalance_threshold, imbalance_ratio
        self.index = PrefixIndex(max_blocks)
        self._decisions = m.create(m.PREFIX_ROUTING, {"tier": self._deployment_id.name})
        self._known: set[str] = set()
        self._in_flight: Counter[str] = Counter()  # replica -> requests routed there, not yet completed
        self._routed: dict[str, list[str]] = {}  # internal request id -> replicas its calls were routed to
        self._choice: weakref.WeakKeyDictionary[asyncio.Future, str] = weakref.WeakKeyDictionary()
        self._routing: weakref.WeakKeyDictionary[asyncio.Task, PendingRequest] = weakref.WeakKeyDictionary()

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        request = _generate_request(pending_request)
        if request is None or not candidate_replicas:  # other calls (health, tokenize): any replica
            return [candidate_replicas]
        candidates = candidate_replicas
        if pending_request is not None and pending_request.metadata.multiplexed_model_id:
            holding = self.apply_multiplex_routing(pending_request=pending_request)
            candidates = [r for r in candidate_replicas if r.replica_id in holding] or candidate_replicas
        by_id = {r.replica_id.unique_id: r for r in candidates}
        loads = {rid: float(self._in_flight[rid]) for rid in by_id}
        hashes = block_hashes(request_text(request), self.block_chars, request.lora and request.lora.key)
        decision = choose(self.index, hashes, loads, self.imbalance_threshold, self.imbalance_ratio)
        self.index.record(hashes, decision.replica)
        self._decisions.inc(tags={"decision": decision.kind})
        assert pending_request is not None
        routed = self._routed.setdefault(pending_request.metadata.internal_request_id, [])
        if (earlier := self._choice.get(pending_request.future)) is not None:  # again: a replica refused it
            self._in_flight[earlier] -= 1
            routed.remove(earlier)
        self._choice[pending_request.future] = decision.replica
        routed.append(decision.replica)
        self._in_flight[decision.replica] += 1
        if (task := asyncio.current_task()) is not None:
            self._routing[task] = pending_request
        rest = sorted((r for rid, r in by_id.items() if rid != decision.replica),
                      key=lambda r: loads[r.replica_id.unique_id])
        return [[by_id[decision.replica]], rest] if rest else [[by_id[decision.replica]]]

    def _fulfill_next_pending_request(self, replica: RunningReplica, request_metadata: Any = None) -> None:
        task = asyncio.current_task()
        pending = self._routing.pop(task, None) if task is not None else None
        if pending is None or pending.future.done():
            super()._fulfill_next_pending_request(replica, request_metadata)
            return
        self._cancel_routing_task_for_pending_request(pending)
        self._record_queue_wait_time(pending)
        pending.future.set_result(replica)
        self._remove_pending_request_from_indices(pending)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        super().on_request_completed(replica_id, internal_request_id)
        routed = self._routed.get(internal_request_id, [])
        if replica_id.unique_id in routed:
            routed.remove(replica_id.unique_id)
            self._in_flight[replica_id.unique_id] -= 1
        if not routed:
            self._routed.pop(internal_request_id, None)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        current = {r.replica_id.unique_id for r in replicas}
        for gone in self._known - current:
            self.index.forget(gone)
            self._in_flight.pop(gone, None)
        self._known = current

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.index.forget(replica_id.unique_id)


def _generate_request(pending: PendingRequest | None) -> GenerateRequest | None:
    if pending is None:
        return None
    return next((a for a in pending.args if isinstance(a, GenerateRequest)), None)
