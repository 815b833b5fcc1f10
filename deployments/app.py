"""The application builder: `import_path: deployments.app:build_app` in a Serve config file.

Validates everything the application takes before any replica starts: the `args` schema, the
checkpoint, each tier's parallelism against the checkpoint, and each tier's engine
configuration (the engine's own types, embedded in the tier's). Errors name the offending key.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from deployments import metrics
from deployments.adapter_registry import AdapterRegistry
from deployments.config import ROUTER_DEPLOYMENT, AppConfig, TierConfig
from deployments.prefix_router import PrefixAffinityRouter
from deployments.replica import ModelReplica
from deployments.router import Router, RouterSettings
from engine.checkpoint import default_model_dir
from engine.model_config import ModelConfig, load_model_config


def validate(args: dict[str, Any]) -> tuple[AppConfig, ModelConfig]:
    """Raises ValueError (pydantic's ValidationError is one) naming the first bad key."""
    config = AppConfig.model_validate(args)
    # The embedded default is written here if absent, so a fresh machine serves out of the box.
    model_dir = config.model_dir() or default_model_dir()
    try:
        model_config, _ = load_model_config(model_dir)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"model: cannot read the checkpoint at {model_dir}: {err}") from err
    config.auth.entries()  # the key file or variable is readable (the router reads it again)
    for name, tier in config.tiers.items():
        tier.check(name, model_config.num_attention_heads, model_config.num_key_value_heads)
    return config, model_config


# NOTE: Serve's defaults run a replica's user code on an event loop of its own thread, and each
# handle's request router on another: a streamed message then crosses threads twice per process,
# under one GIL. With the engine core in its own process a replica's loop has little else to do; one
# loop per process took a unary router -> replica call from ~15-25 to ~11-15 ms, and one stream's
# first token from ~32 to ~24 ms, on two cores (Ray's documented switches, per deployment).
_ONE_LOOP = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}

# NOTE: Serve 2.60 marks the autoscaling config's `metrics_interval_s` deprecated in favour of these
# variables, yet still reads only the field (replica, handle and controller). We pass both, so a
# tier's push interval holds on the Serve of today and of tomorrow, and silence the warning that
# would otherwise greet every deployment with a field we cannot yet drop.
_REPLICA_PUSH_S = "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"
_HANDLE_PUSH_S = "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S"  # the router holds the tiers' handles
_DEPRECATED_INTERVAL = r"The `metrics_interval_s` field in AutoscalingConfig is deprecated"

# NOTE: how often a stopping replica (scaled down, replaced, shut down) looks whether its requests
# have finished. Serve's 2 s kept every replica alive 2-4 s with nothing in flight (a whole app's
# `serve.shutdown()` took 4.7 s on two cores, 1.8 s at 0.25 s); graceful_shutdown_timeout_s still
# bounds how long requests in flight may take.
_SHUTDOWN_POLL_S = 0.25


def _placement(tier: TierConfig) -> dict[str, Any]:
    """Replica resources: one actor, or with tensor parallelism one placement-group bundle per rank
    (the replica takes bundle 0, its rank actors the others; see deployments/tp_workers.py)."""
    dep, tp = tier.deployment, tier.engine.tensor_parallel_size
    per_rank = {"num_cpus": dep.num_cpus / tp, "num_gpus": dep.num_gpus / tp}
    env = _ONE_LOOP | {_REPLICA_PUSH_S: str(tier.autoscaling.metrics_interval_s)}
    options = per_rank | {"runtime_env": {"env_vars": env}}
    if tp == 1:
        return {"ray_actor_options": options}
    bundle = {"CPU": per_rank["num_cpus"]} | ({"GPU": per_rank["num_gpus"]} if dep.num_gpus else {})
    return {
        "ray_actor_options": options,
        "placement_group_bundles": [bundle] * tp,
        "placement_group_strategy": dep.placement_strategy,
    }


# Ray's resource of the head node (Ray Train pins its state actor with it too): a tiny amount of it
# places an actor there.
_ON_HEAD = {"resources": {"node:__internal_head__": 0.001}}


def _router_config(tier: TierConfig) -> dict[str, Any]:
    routing = tier.routing
    if not routing.prefix_affinity:
        return {}
    kwargs = {"block_chars": routing.block_chars, "imbalance_threshold": routing.imbalance_threshold,
              "imbalance_ratio": routing.imbalance_ratio}
    return {"request_router_config": RequestRouterConfig(request_router_class=PrefixAffinityRouter,
                                                         request_router_kwargs=kwargs)}


def build_app(args: dict[str, Any]) -> Application:
    config, model_config = validate(args)
    # Every tier's latency targets are buckets of every tier's histograms (the dashboards read them).
    buckets = metrics.histogram_buckets(
        metrics.tier_targets(t.tuning.itl_target_ms, t.tuning.ttft_target_ms) for t in config.tiers.values())
    model_dir = config.model_dir()
    handles = {}
    for name, tier in config.tiers.items():
        # NOTE: `model: None` travels as None: each replica's engine resolves the embedded default
        # on its own node. The scheduler knobs travel once, as user_config (`reconfigure`).
        engine = tier.engine.model_copy(update={"model": model_dir and str(model_dir), "load_progress": False})
        dep = tier.deployment
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", _DEPRECATED_INTERVAL, DeprecationWarning)
            deployment = ModelReplica.options(
                name=name,
                autoscaling_config=tier.autoscaling.serve_config(),
                user_config=tier.tuning.model_dump(mode="json"),
                **_placement(tier),
                max_ongoing_requests=dep.max_ongoing_requests,
                health_check_period_s=dep.health_check_period_s,
                health_check_timeout_s=dep.health_check_timeout_s,
                graceful_shutdown_timeout_s=dep.graceful_shutdown_timeout_s,
                graceful_shutdown_wait_loop_s=_SHUTDOWN_POLL_S,
                **_router_config(tier),
            )
        handles[name] = deployment.bind(name, engine, dep.engine_stall_s, dep.graceful_shutdown_timeout_s, buckets)
    context = model_config.max_position_embeddings
    settings = RouterSettings(
        served_model_name=config.served_model_name or (model_dir or default_model_dir()).name,
        default_tier=config.default_tier,
        max_model_len={n: min(t.engine.max_model_len or context, context) for n, t in config.tiers.items()},
        auth=config.auth,
        admission={n: t.admission for n, t in config.tiers.items()},
        max_body_bytes=config.router.max_body_bytes,
        adapters={n: {a: str(Path(p).expanduser()) for a, p in config.tier_lora(n).adapters.items()}
                  for n in config.tiers},
        runtime_loading={n: config.tier_lora(n).runtime_loading for n in config.tiers},
    )
    router = config.router
    on_head = _ON_HEAD if router.placement == "head" else {}
    registry = (AdapterRegistry.options(ray_actor_options={"num_cpus": 0, **on_head}).bind()
                if any(settings.runtime_loading.values()) else None)
    return Router.options(
        name=ROUTER_DEPLOYMENT,
        num_replicas=router.num_replicas,
        ray_actor_options={"num_cpus": router.num_cpus, **on_head, "runtime_env": {"env_vars": _ONE_LOOP | {
            _HANDLE_PUSH_S: str(min(t.autoscaling.metrics_interval_s for t in config.tiers.values()))}}},
        max_ongoing_requests=router.max_ongoing_requests,
        graceful_shutdown_wait_loop_s=_SHUTDOWN_POLL_S,
    ).bind(handles, settings, registry)
