"""Price per million tokens of a measured `bench serve` run, as hosted platforms quote it.

Prompt and generated tokens are priced apart, as Fireworks and the others price them, then blended
at a prompt:generation ratio (4:1, a chat's usual mix, by default):

    run cost          = GPU-hour price x GPUs per replica x replicas x run duration
    prompt share      = the requests' time before their first token (queue + prefill)
                        / their whole time, summed over successful requests
    $/1M prompt       = run cost x prompt share       / prompt tokens    x 1e6
    $/1M generated    = run cost x (1 - prompt share) / generated tokens x 1e6
    $/1M blended      = (P x $/1M prompt + G x $/1M generated) / (P + G), at the ratio P:G

NOTE: the split is by where the requests' time went, not by FLOPs: on a server, a prompt's cost is
the time it holds the batch before its first token, which is what a client pays for in TTFT. Higher
load spreads the same hourly price over more tokens, so a sweep shows the price falling until the
server saturates.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from benchmarks.serve_report import RequestResult


class Pricing(BaseModel):
    gpu_hour_usd: float = Field(gt=0)
    gpus_per_replica: dict[str, float] = {}  # per tier (from a Serve config); others: `default_gpus`
    default_gpus: float = Field(1.0, gt=0)  # a CPU-only machine counts as one
    replicas: int = Field(1, ge=1)  # replicas serving the tier during the run
    blend: tuple[float, float] = (4.0, 1.0)  # prompt : generated tokens

    def replica_hour_usd(self, tier: str | None) -> float:
        gpus = self.gpus_per_replica.get(tier or "", self.default_gpus)
        return self.gpu_hour_usd * gpus * self.replicas


class Cost(BaseModel):
    hour_usd: float  # what the tier's replicas cost an hour
    prompt_share: float  # of the run's cost, charged to prompt tokens
    usd_per_m_prompt: float | None
    usd_per_m_generated: float | None
    usd_per_m_blended: float | None
    # The run's cost over all its tokens, prompt and generated: what load lowers. (The split above
    # follows client-side time, which charges queueing before the first token to the prompt.)
    usd_per_m_tokens: float | None = None


def gpus_per_tier(config_file: Path) -> dict[str, float]:
    """Each tier's GPUs per replica (`deployment.num_gpus`) in a Serve config of our app."""
    from deployments.config import TierDeployment

    config = yaml.safe_load(config_file.read_text())
    gpus: dict[str, float] = {}
    for app in config.get("applications", []):
        for name, tier in (app.get("args") or {}).get("tiers", {}).items():
            num_gpus = TierDeployment.model_validate(tier.get("deployment", {})).num_gpus
            if num_gpus == 0:
                raise ValueError(f"{config_file}: tier {name} reserves no GPU; price it with --gpus-per-replica "
                                 "(a CPU-only machine counts as one) instead of --config")
            gpus[name] = num_gpus
    if not gpus:
        raise ValueError(f"{config_file}: no tiers found")
    return gpus


def cost_of(records: list[RequestResult], duration_s: float, pricing: Pricing, tier: str | None) -> Cost:
    ok = [r for r in records if r.status == "ok" and r.ttft_ms is not None]
    hour = pricing.replica_hour_usd(tier)
    run_usd = hour * duration_s / 3600
    before_first = sum(r.ttft_ms or 0.0 for r in ok)
    whole = sum(r.e2e_ms for r in ok)
    share = before_first / whole if whole > 0 else 0.0
    prompt_tokens = sum(r.input_tokens or 0 for r in ok)
    generated_tokens = sum(r.output_tokens for r in ok)
    per_prompt = run_usd * share / prompt_tokens * 1e6 if prompt_tokens else None
    per_generated = run_usd * (1 - share) / generated_tokens * 1e6 if generated_tokens else None
    blended = None
    if per_prompt is not None and per_generated is not None:
        p, g = pricing.blend
        blended = (p * per_prompt + g * per_generated) / (p + g)
    total = prompt_tokens + generated_tokens
    return Cost(hour_usd=hour, prompt_share=share, usd_per_m_prompt=per_prompt,
                usd_per_m_generated=per_generated, usd_per_m_blended=blended,
                usd_per_m_tokens=run_usd / total * 1e6 if total else None)
