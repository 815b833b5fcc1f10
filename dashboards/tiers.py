"""What the dashboards and rules take from a Serve config file: the tiers and their targets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from deployments import metrics as m
from deployments.config import TierConfig

BUILD_APP = "deployments.app:build_app"


@dataclass(frozen=True)
class Tier:
    name: str
    targets: dict[m.TargetKind, float]  # seconds
    target_queue_depth: float  # per replica, what the autoscaler aims for


def load_tiers(path: Path) -> list[Tier]:
    """The tiers of the config's mixtral-serve application, in the file's order.

    NOTE: only the tiers are validated (not the whole app's `args`): a config naming a checkpoint
    folder that exists only on the serving machines still builds its dashboards anywhere.
    """
    config = yaml.safe_load(Path(path).read_text())
    apps = [a for a in config.get("applications", []) if a.get("import_path") == BUILD_APP]
    if not apps:
        raise ValueError(f"{path}: no application with import_path {BUILD_APP}")
    tiers = []
    for name, raw in apps[0]["args"]["tiers"].items():
        tier = TierConfig.model_validate(raw)
        tiers.append(Tier(name, m.tier_targets(tier.tuning.itl_target_ms, tier.tuning.ttft_target_ms),
                          tier.autoscaling.target_queue_depth))
    return tiers
