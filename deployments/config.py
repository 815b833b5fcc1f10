"""The application's configuration: the `args` of a Serve config file, validated once by the builder.

Pure pydantic (no Ray, no torch): the router process imports it too. A tier's `engine` and
`tuning` blocks are the engine's own types (engine/config.py), embedded, not mirrored.

Layout of `args` (see configs/local.yaml):

    model, served_model_name, default_tier
    lora:    LoRA adapters every tier serves: {adapters: {name: folder}, runtime_loading}
    auth:    API keys (deployments/auth.py)
    router:  {num_replicas, num_cpus, max_ongoing_requests, max_body_bytes}
    tiers:
      <name>:
        engine:      what a replica loads: engine.config.EngineConfig (dtype, device, context, cache,
                     parallelism, kernels), less `model` (the app's) and `scheduler` (= tuning)
        tuning:      engine.config.SchedulerConfig; sent as Serve `user_config`, so live-tunable
        autoscaling: replica bounds and the queue-depth policy's knobs
        deployment:  Ray resources and Serve replica options
        admission:   the router's queue limits and time limit for the tier (deployments/backpressure.py)
        lora:        adapters this tier serves besides the app's; its engine's `lora` block sizes the slots
        routing:     how requests pick a replica: prefix affinity balanced against load (deployments/prefix_router.py)
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from deployments.auth import AuthConfig
from deployments.backpressure import AdmissionConfig
from engine.config import EngineConfig, SchedulerConfig

POLICY_FUNCTION = "deployments.autoscaling:QueueDepthPolicy"
ROUTER_DEPLOYMENT = "router"
# Tier names become URL path segments and deployment names; these would collide.
_RESERVED_TIERS = {"v1", "health", ROUTER_DEPLOYMENT}

TierName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9-]{0,31}$")]
# What a client puts in `model` to select the adapter.
AdapterName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TierAutoscaling(_Strict):
    """Replica bounds plus the queue-depth policy; delays and factors are applied by Serve."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    # Engine queue (waiting + running sequences) one replica should carry.
    target_queue_depth: float = Field(8.0, gt=0)
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)
    upscaling_factor: float | None = Field(None, gt=0)
    downscaling_factor: float | None = Field(None, gt=0)
    # How often replicas push their queue signal, and the window it is averaged over.
    # Serve's default of 10 s reacts too slowly. (Deprecated in Serve 2.60 for environment
    # variables, which deployments/app.py sets too.)
    metrics_interval_s: float = Field(2.0, gt=0)
    look_back_period_s: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "TierAutoscaling":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        if self.look_back_period_s <= self.metrics_interval_s:
            raise ValueError("look_back_period_s must be longer than metrics_interval_s")
        return self

    def serve_config(self) -> dict[str, Any]:
        """Serve's `autoscaling_config`, with the queue-depth policy plugged in."""
        config = self.model_dump(exclude={"target_queue_depth"}, exclude_none=True)
        config["policy"] = {
            "policy_function": POLICY_FUNCTION,
            "policy_kwargs": {"target_queue_depth": self.target_queue_depth},
        }
        return config


class TierDeployment(_Strict):
    """Ray resources and Serve options of each replica of a tier."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    # With tensor parallelism: how the per-rank bundles may spread (STRICT_PACK: one node).
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = "STRICT_PACK"
    # NOTE: high on purpose: the engine does the queueing (and reports it to the autoscaler);
    # Serve's own per-replica cap would hide the queue from it.
    max_ongoing_requests: int = Field(1024, ge=1)
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)
    # Also how long `drain()` lets in-flight requests finish before aborting them.
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0)
    # A replica whose engine step has not finished for this long reports itself unhealthy.
    engine_stall_s: float = Field(120.0, gt=0)


class LoRAServing(_Strict):
    """LoRA adapters served by name (`model: <name>` on every endpoint), from folders every replica's
    node can read (PEFT or mistral-finetune layout). The engine's `lora` block (slots, max rank) is
    the tier's `engine.lora`."""

    adapters: dict[AdapterName, str] = Field(default_factory=dict)
    # POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's) add and remove adapters at runtime.
    runtime_loading: bool = False

    def merged(self, other: "LoRAServing | None") -> "LoRAServing":
        if other is None:
            return self
        return LoRAServing(adapters=self.adapters | other.adapters,
                           runtime_loading=self.runtime_loading or other.runtime_loading)


class TierRouting(_Strict):
    """How the router picks one of the tier's replicas. With `prefix_affinity`, the replica it sent the
    longest shared prefix to (a conversation's earlier turns, a common system prompt) while that one
    carries at most max(`imbalance_threshold`, `imbalance_ratio` x the mean load) more requests than
    the least loaded, which takes the request otherwise; without it, Serve's default (the less loaded
    of two random replicas)."""

    prefix_affinity: bool = True
    imbalance_threshold: float = Field(2.0, ge=0)
    imbalance_ratio: float = Field(0.5, ge=0)
    block_chars: int = Field(256, ge=16)  # prefix granularity, in characters (~60 tokens of English)


class TierConfig(_Strict):
    engine: EngineConfig = EngineConfig()
    # The engine's scheduler knobs, delivered to replicas only as Serve `user_config`: changing them
    # in a redeployed config reaches running replicas via `reconfigure()`, without a restart.
    tuning: SchedulerConfig = SchedulerConfig()
    autoscaling: TierAutoscaling = TierAutoscaling()
    deployment: TierDeployment = TierDeployment()
    admission: AdmissionConfig = AdmissionConfig()
    lora: LoRAServing | None = None
    routing: TierRouting = TierRouting()

    @model_validator(mode="after")
    def _engine_keys(self) -> "TierConfig":
        for key, owner in (("model", "the app's `model`"), ("scheduler", "the tier's `tuning` block")):
            if key in self.engine.model_fields_set:
                raise ValueError(f"engine.{key} is not a tier setting: it comes from {owner}")
        return self

    def check(self, name: str, num_attention_heads: int, num_key_value_heads: int) -> None:
        """Checks against the checkpoint and the resources; errors name the offending key."""
        key = f"tiers.{name}"
        tp = self.engine.tensor_parallel_size
        for what, heads in (("num_attention_heads", num_attention_heads), ("num_key_value_heads", num_key_value_heads)):
            if heads % tp:
                raise ValueError(
                    f"{key}.engine.tensor_parallel_size={tp} does not divide the checkpoint's {what} ({heads})"
                )
        gpus = self.deployment.num_gpus
        on_gpu = self.engine.device.startswith("cuda")
        if on_gpu and gpus != tp:
            raise ValueError(
                f"{key}.deployment.num_gpus={gpus:g} must equal {key}.engine.tensor_parallel_size={tp} "
                "(one GPU per tensor-parallel rank)"
            )
        if not on_gpu and gpus:
            raise ValueError(f"{key}.deployment.num_gpus={gpus:g} but {key}.engine.device is {self.engine.device!r}")


class RouterConfig(_Strict):
    num_replicas: int = Field(1, ge=1)
    # "head": router replicas run on the head node, beside a HeadOnly proxy and Ray's own control
    # plane: a worker node that dies then takes only its model replicas' streams (each ended with an
    # error event), never a router's and with it every stream through it. "spread": anywhere (with
    # proxy_location EveryNode, to be near each node's proxy).
    placement: Literal["head", "spread"] = "head"
    num_cpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int = Field(2048, ge=1)
    # Larger request bodies get 413 before they are read.
    max_body_bytes: int = Field(1 << 20, ge=1024)


class AppConfig(_Strict):
    # A checkpoint folder; null = the embedded tiny random-weight checkpoint (created if absent).
    model: str | None = None
    served_model_name: str | None = None  # default: the checkpoint folder's name
    default_tier: str
    tiers: dict[TierName, TierConfig] = Field(min_length=1)
    router: RouterConfig = RouterConfig()
    auth: AuthConfig = AuthConfig()
    lora: LoRAServing = LoRAServing()

    @field_validator("model")
    @classmethod
    def _model_exists(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).expanduser().is_dir():
            raise ValueError(f"checkpoint folder {value!r} does not exist")
        return value

    @field_validator("tiers")
    @classmethod
    def _tier_names(cls, tiers: dict[str, TierConfig]) -> dict[str, TierConfig]:
        reserved = sorted(_RESERVED_TIERS & tiers.keys())
        if reserved:
            raise ValueError(f"tier names {reserved} are reserved")
        return tiers

    @model_validator(mode="after")
    def _check_default(self) -> "AppConfig":
        if self.default_tier not in self.tiers:
            raise ValueError(f"default_tier {self.default_tier!r} is not one of the tiers {sorted(self.tiers)}")
        return self

    @model_validator(mode="after")
    def _check_adapters(self) -> "AppConfig":
        for name, tier in self.tiers.items():
            lora = self.tier_lora(name)
            for adapter, folder in lora.adapters.items():
                if adapter == self.served_model_name:
                    raise ValueError(f"adapter name {adapter!r} is the served model's name")
                if not Path(folder).expanduser().is_dir():
                    raise ValueError(f"adapter {adapter!r}: folder {folder!r} does not exist")
            if (lora.adapters or lora.runtime_loading) and not tier.engine.lora.max_loras:
                raise ValueError(f"tiers.{name} serves LoRA adapters but tiers.{name}.engine.lora.max_loras is 0: "
                                 "give it adapter slots")
        return self

    def tier_lora(self, tier: str) -> LoRAServing:
        """The adapters a tier serves: the app's and its own."""
        return self.lora.merged(self.tiers[tier].lora)

    def model_dir(self) -> Path | None:
        return Path(self.model).expanduser() if self.model is not None else None

