"""Autoscaling on the engine's own queue: Serve's custom policy hook, one instance per tier.

Replicas report `queue_depth` (waiting + running sequences in their engine) and
`ttft_breaches` (requests still without a first token past the tier's TTFT target) through
`record_autoscaling_stats()`; Serve averages each over `look_back_period_s` and calls the
policy about every 0.1 s in the controller. Serve then applies the up/downscaling factors,
the up/downscale delays and min/max_replicas around what the policy asks for.

NOTE: a class, not a function: Serve passes `policy_kwargs` only to a class constructor, and
the instance keeps the gauges.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

from ray.serve.config import AutoscalingContext

from deployments import metrics as m

log = logging.getLogger("ray.serve")

_LAST_LOGGED = "mixtral_serve_last_logged"  # policy_state key


@functools.cache
def _gauges() -> tuple[Any, ...]:
    """One set per process: the controller runs every tier's policy, each labelling its own."""
    return tuple(m.create(spec) for spec in (m.DESIRED_REPLICAS, m.CURRENT_REPLICAS, m.QUEUE_DEPTH, m.TTFT_BREACHES))


class QueueDepthPolicy:
    def __init__(self, target_queue_depth: float) -> None:
        if target_queue_depth <= 0:
            raise ValueError(f"target_queue_depth must be > 0, got {target_queue_depth}")
        self.target_queue_depth = target_queue_depth
        self._desired, self._current, self._signal, self._breaches = _gauges()

    def desired_replicas(self, queue_depth: float, ttft_breaches: float, current: int) -> int:
        desired = math.ceil(queue_depth / self.target_queue_depth - 1e-9)
        if ttft_breaches > 0:  # requests wait past the TTFT target: one more replica whatever the depth
            desired = max(desired, current + 1)
        return desired

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        depths = metrics.get("queue_depth", {})
        state = dict(ctx.policy_state)
        if not depths:  # no replica has reported yet: hold
            return ctx.target_num_replicas, state
        queue_depth = sum(depths.values())
        breaches = sum(metrics.get("ttft_breaches", {}).values())
        current = ctx.current_num_replicas
        desired = self.desired_replicas(queue_depth, breaches, current)

        # Serve bounds the answer to [min, max] replicas; logging within the bounds keeps the log to
        # decisions that can change something.
        bounded = min(max(desired, ctx.capacity_adjusted_min_replicas), ctx.capacity_adjusted_max_replicas)
        tags = {"application": ctx.app_name or "", "tier": ctx.deployment_name}
        self._desired.set(bounded, tags=tags)
        self._current.set(current, tags=tags)
        self._signal.set(queue_depth, tags=tags)
        self._breaches.set(breaches, tags=tags)
        decision = [bounded, current]
        if state.get(_LAST_LOGGED) != decision:
            log.info(
                "autoscaling tier %s: queue depth %.1f over %d replica(s) (target %g each), "
                "TTFT breaches %.1f -> %d replica(s) wanted (%d before bounds)",
                ctx.deployment_name, queue_depth, current, self.target_queue_depth, breaches, bounded, desired,
            )
            state[_LAST_LOGGED] = decision
        return desired, state
