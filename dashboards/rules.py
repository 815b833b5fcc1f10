"""Prometheus recording and alerting rules for a mixtral-serve deployment (`cluster/prometheus-rules/`).

Built from the same config and PromQL builders as the dashboards: the SLO rules read the
histogram bucket at each tier's target, which exists because the replicas add every tier's
targets to their buckets (deployments/metrics.py `histogram_buckets`).
"""

from __future__ import annotations

from typing import Any

from dashboards import promql as q
from dashboards.overview import SLO_OBJECTIVE
from dashboards.tiers import Tier
from deployments import metrics as m

WINDOW = "5m"
_ALL = ""  # no selector: every tier


def _record(name: str, expr: str) -> dict[str, Any]:
    return {"record": name, "expr": expr}


def _alert(name: str, expr: str, duration: str, severity: str, summary: str) -> dict[str, Any]:
    return {"alert": name, "expr": expr, "for": duration, "labels": {"severity": severity},
            "annotations": {"summary": summary}}


def _attainment_record(kind: m.TargetKind) -> str:
    return f"tier:mixtral_{kind}_slo_attainment:ratio_rate{WINDOW}"


def build(tiers: list[Tier]) -> dict[str, Any]:
    recording = [
        *(_record(f"tier:{spec.name}:p99_rate{WINDOW}", q.quantile(0.99, spec, "tier", _ALL, WINDOW))
          for spec in (m.TTFT, m.ITL, m.E2E, m.QUEUE_TIME)),
        *(_record(f"tier:{spec.name}:rate{WINDOW}", q.sum_by("tier", q.rate(spec, _ALL, WINDOW)))
          for spec in (m.GENERATION_TOKENS, m.PROMPT_TOKENS)),
        _record(f"tier_layer:mixtral_moe_expert_imbalance:ratio_rate{WINDOW}", q.expert_imbalance(_ALL, WINDOW)),
    ]
    for tier in tiers:
        for kind, target in tier.targets.items():
            spec = m.TTFT if kind == "ttft" else m.ITL
            recording.append(_record(_attainment_record(kind),
                                     q.fraction_under(spec, target, q.selector(tier=tier.name), WINDOW)))
    kinds = sorted({kind for tier in tiers for kind in tier.targets})
    slo_alerts = [_alert(f"Mixtral{kind.upper()}SLOMissed", f"{_attainment_record(kind)} < {SLO_OBJECTIVE}", "10m",
                         "warning", f"tier {{{{ $labels.tier }}}}: under {SLO_OBJECTIVE:.0%} of {kind.upper()}s "
                         "within the tier's target for 10 minutes")
                  for kind in kinds]

    requests = q.sum_by("tier", q.rate(m.HTTP_REQUESTS, _ALL, WINDOW))
    errors = q.sum_by("tier", q.rate(m.HTTP_REQUESTS, q.selector(status_code="~5.."), WINDOW))
    alerts = [
        *slo_alerts,
        _alert("MixtralServerErrors", f"{errors} / {requests} > 0.05", "5m", "critical",
               "tier {{ $labels.tier }}: over 5% of requests fail with a 5xx status"),
        _alert("MixtralKVCacheFull", f"max by (tier, replica) ({q.series(m.KV_USAGE)}) > 0.95", "10m", "warning",
               "replica {{ $labels.replica }} of tier {{ $labels.tier }}: KV cache over 95% full"),
        _alert("MixtralPreempting", f"{q.sum_by('tier', q.rate(m.PREEMPTIONS, _ALL, WINDOW))} > 0", "10m",
               "warning", "tier {{ $labels.tier }}: sequences are being preempted (KV cache too small for the load)"),
        _alert("MixtralCannotScaleUp",
               f"max by (tier) ({q.series(m.DESIRED_REPLICAS)}) > max by (tier) ({q.series(m.CURRENT_REPLICAS)})",
               "15m", "warning",
               "tier {{ $labels.tier }}: the autoscaler wants more replicas than run (max_replicas or no resources)"),
        _alert("MixtralEngineStalled",
               f"{q.sum_by('tier, replica', q.rate(m.STEPS, _ALL, '2m'))} == 0 "
               f"and {q.sum_by('tier, replica', q.series(m.RUNNING))} > 0", "2m", "critical",
               "replica {{ $labels.replica }} of tier {{ $labels.tier }}: requests running but no engine step"),
    ]
    return {"groups": [
        {"name": "mixtral-serve-recording", "rules": recording},
        {"name": "mixtral-serve-alerts", "rules": alerts},
    ]}
