"""The app's configuration (validated by the builder before any replica starts), the shipped
configs, the queue-depth policy's arithmetic and the router's import boundary. No Ray cluster."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployments.app import build_app, validate
from deployments.autoscaling import QueueDepthPolicy
from deployments.config import AppConfig
from engine.config import EngineConfig
from engine.model_config import ModelConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# The real architectures (config.json values of the Hugging Face checkpoints).
SHAPES = {
    "mixtral-8x7b-instruct.yaml": ModelConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=32768),
    "mixtral-8x22b-instruct.yaml": ModelConfig(
        vocab_size=32768, hidden_size=6144, intermediate_size=16384, num_hidden_layers=56, num_attention_heads=48,
        num_key_value_heads=8, head_dim=128, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=65536),
}


def app_args(name: str) -> dict[str, Any]:
    config = yaml.safe_load((CONFIGS / name).read_text())
    return config["applications"][0]["args"]


def test_local_config_builds_three_tiers() -> None:
    config, model = validate(app_args("local.yaml"))
    tiers = config.tiers
    assert sorted(tiers) == ["fixed-latency", "latency", "throughput"]
    assert tiers["fixed-latency"].tuning.target_step_seconds == pytest.approx(0.035)  # 50 ms - 15 ms
    assert tiers["throughput"].tuning.max_num_seqs > tiers["latency"].tuning.max_num_seqs
    assert model.hidden_size == 128  # the embedded tiny checkpoint
    for tier in config.tiers.values():  # fractional CPUs: all tiers can scale on 2 cores
        assert tier.deployment.num_cpus * tier.autoscaling.max_replicas * 3 <= 2


def test_push_interval_reaches_serve_both_ways_without_a_deprecation_warning() -> None:
    """Serve 2.60 reads `metrics_interval_s` from the autoscaling config and deprecates it for
    environment variables: the app sets both, and building it warns of nothing."""
    args = app_args("local.yaml")
    intervals = {name: tier["autoscaling"]["metrics_interval_s"] for name, tier in args["tiers"].items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        router = build_app(args)._bound_deployment
    router_env = router.ray_actor_options["runtime_env"]["env_vars"]
    assert float(router_env["RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S"]) == min(intervals.values())
    for name, handle in router.init_args[0].items():
        replica = handle._bound_deployment
        env = replica.ray_actor_options["runtime_env"]["env_vars"]
        assert float(env["RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"]) == intervals[name]
        assert replica._deployment_config.autoscaling_config.metrics_interval_s == intervals[name]


def test_stopping_replicas_look_for_finished_requests_often() -> None:
    """Serve's 2 s poll kept a replica with nothing in flight alive for 2-4 s after every
    scale-down or shutdown; each deployment of the app polls at most every half second."""
    router = build_app(app_args("local.yaml"))._bound_deployment
    deployments = [router, *(handle._bound_deployment for handle in router.init_args[0].values())]
    assert len(deployments) == 4
    for deployment in deployments:
        config = deployment._deployment_config
        assert config.graceful_shutdown_wait_loop_s <= 0.5, deployment.name
        assert config.graceful_shutdown_timeout_s >= config.graceful_shutdown_wait_loop_s


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_gpu_profiles_validate_against_the_real_shapes(tmp_path: Path, name: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps(SHAPES[name].to_hf()))
    args = app_args(name) | {"model": str(tmp_path)}
    config = AppConfig.model_validate(args)
    shape = SHAPES[name]
    for tier_name, tier in config.tiers.items():
        tier.check(tier_name, shape.num_attention_heads, shape.num_key_value_heads)
        assert tier.engine.device == "cuda" and tier.deployment.num_gpus == tier.engine.tensor_parallel_size
        assert tier.engine.max_model_len <= shape.max_position_embeddings
    assert config.tiers["fixed-latency"].tuning.itl_target_ms is not None
    # The builder's checks pass, and every tier's engine block is the engine's own configuration.
    validated, _ = validate(args)
    for tier_name, tier in config.tiers.items():
        assert isinstance(validated.tiers[tier_name].engine, EngineConfig)
        assert validated.tiers[tier_name].engine.tensor_parallel_size == tier.engine.tensor_parallel_size
        assert validated.tiers[tier_name].engine.quantization == tier.engine.quantization


def _local() -> dict[str, Any]:
    return copy.deepcopy(app_args("local.yaml"))


def _set(path: str, value: Any) -> dict[str, Any]:
    args = _local()
    *parents, leaf = path.split(".")
    node = args
    for key in parents:
        node = node[key]
    node[leaf] = value
    return args


def _rename_tier(old: str, new: str) -> dict[str, Any]:
    args = _local()
    args["tiers"][new] = args["tiers"].pop(old)
    return args


@pytest.mark.parametrize(("args", "message"), [
    (_rename_tier("throughput", "Bulk Tier"), r"tiers\.Bulk Tier\.\[key\]"),
    (_rename_tier("throughput", "v1"), r"tier names \['v1'\] are reserved"),
    (_set("tiers.latency.tuning.max_seqs", 4), r"tiers\.latency\.tuning\.max_seqs\s+Extra inputs"),
    (_set("tiers.latency.engine.quantisation", "fp8"), r"tiers\.latency\.engine\.quantisation"),
    (_set("model", "/no/such/checkpoint"), r"model\s+Value error, checkpoint folder '/no/such/checkpoint' does not exist"),
    (_set("tiers.latency.engine.tensor_parallel_size", 3),
     r"tiers\.latency\.engine\.tensor_parallel_size=3 does not divide the checkpoint's num_attention_heads \(4\)"),
    (_set("tiers.latency.deployment.num_gpus", 1), r"tiers\.latency\.deployment\.num_gpus=1 but .*device is 'cpu'"),
    (_set("default_tier", "turbo"), r"default_tier 'turbo' is not one of the tiers"),
    (_set("tiers.latency.tuning.max_num_batched_tokens", 2), r"tiers\.latency\.tuning\s.*max_num_batched_tokens \(2\)"),
    (_set("tiers.latency.autoscaling.max_replicas", 0), r"tiers\.latency\.autoscaling\.max_replicas"),
    (_set("tiers.latency.engine.quantization", "int4"), r"tiers\.latency\.engine\.quantization"),
    (_set("tiers.fixed-latency.tuning.itl_serving_margin_ms", 60),
     r"tiers\.fixed-latency\.tuning\s.*itl_serving_margin_ms \(60.0\) must be below itl_target_ms"),
    (_set("lora", {"runtime_loading": True}),
     r"tiers\.latency serves LoRA adapters but tiers\.latency\.engine\.lora\.max_loras is 0"),
    (_set("tiers.latency.lora", {"adapters": {"sql": "/no/such/adapter"}}),
     r"adapter 'sql': folder '/no/such/adapter' does not exist"),
    (_set("lora", {"adapters": {"bad name": "/tmp"}}), r"lora\.adapters\.bad name\.\[key\]"),
    (_set("tiers.latency.lora", {"adapters": {"mixtral-tiny": "/tmp"}}), r"is the served model's name"),
])
def test_bad_config_is_an_error_naming_the_key(args: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate(args)


# ---- the queue-depth policy ---------------------------------------------------------------------
def test_policy_asks_for_replicas_by_queue_depth() -> None:
    policy = QueueDepthPolicy(target_queue_depth=4)
    assert policy.desired_replicas(queue_depth=0, ttft_breaches=0, current=2) == 0  # Serve bounds to min
    assert policy.desired_replicas(queue_depth=4, ttft_breaches=0, current=1) == 1
    assert policy.desired_replicas(queue_depth=4.5, ttft_breaches=0, current=1) == 2
    assert policy.desired_replicas(queue_depth=13, ttft_breaches=0, current=1) == 4
    # Requests waiting past the TTFT target ask for one more, whatever the depth.
    assert policy.desired_replicas(queue_depth=1, ttft_breaches=1, current=2) == 3


def test_policy_reads_the_replicas_stats_through_serve_context() -> None:
    from ray.serve._private.common import DeploymentID
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    def context(metrics: dict[str, dict[str, float]], state: dict[str, Any]) -> AutoscalingContext:
        return AutoscalingContext(
            deployment_id=DeploymentID(name="latency", app_name="mixtral"), deployment_name="latency",
            app_name="mixtral", current_num_replicas=2, target_num_replicas=2, running_replicas=[],
            total_num_requests=0.0, total_queued_requests=0.0, aggregated_metrics=metrics, raw_metrics=None,
            capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=4, policy_state=state,
            last_scale_up_time=None, last_scale_down_time=None, current_time=None,
            config=AutoscalingConfig(min_replicas=1, max_replicas=4))

    policy = QueueDepthPolicy(target_queue_depth=4)
    desired, state = policy(context({"queue_depth": {"r1": 9.0, "r2": 7.0}, "ttft_breaches": {"r1": 0.0}}, {}))
    assert desired == 4
    desired, state = policy(context({}, state))  # nothing reported yet: hold the current target
    assert desired == 2


def test_router_process_never_imports_torch() -> None:
    # Of the engine, only its torch-free leaf types (configuration, sampling parameters, output constraints,
    # the adapter a request names).
    code = ("import sys, deployments.router; assert 'torch' not in sys.modules; "
            "engine = sorted(m for m in sys.modules if m.split('.')[0] == 'engine'); "
            "assert engine == ['engine', 'engine.config', 'engine.lora_request', 'engine.sampling_params', "
            "'engine.structured_output'], engine")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=CONFIGS.parent, timeout=120)
