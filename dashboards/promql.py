"""PromQL builders over the metric catalog: the dashboards and the Prometheus rules share them, so
a query names a metric only through its `MetricSpec` (and so only as Ray exports it)."""

from __future__ import annotations

from deployments import metrics as m

# Ray Serve's own metrics the dashboards use (the rest come from deployments/metrics.py).
SERVE_TARGET_REPLICAS = "ray_serve_autoscaling_target_replicas"  # labels: application, deployment
RAY_BUILTIN_SERIES = frozenset({SERVE_TARGET_REPLICAS})


def selector(**matchers: str) -> str:
    """`{tier=~"$tier"}` from tier="~$tier": a value starting with `~` is a regex match."""
    parts = [f'{k}=~"{v[1:]}"' if v.startswith("~") else f'{k}="{v}"' for k, v in matchers.items()]
    return "{" + ",".join(parts) + "}"


def series(spec: m.MetricSpec, sel: str = "", suffix: str = "") -> str:
    name = f"{spec.exported}_{suffix}" if suffix else spec.exported
    assert name in spec.series, f"{name} is not a series of {spec.name}"
    return name + sel


def rate(spec: m.MetricSpec, sel: str, window: str, suffix: str = "") -> str:
    return f"rate({series(spec, sel, suffix)}[{window}])"


def sum_by(labels: str, expr: str) -> str:
    return f"sum by ({labels}) ({expr})"


def quantile(q: float, spec: m.MetricSpec, by: str, sel: str, window: str) -> str:
    return f"histogram_quantile({q}, {sum_by(f'{by}, le', rate(spec, sel, window, 'bucket'))})"


def fraction_under(spec: m.MetricSpec, bound: float, sel: str, window: str, by: str = "tier") -> str:
    """The fraction of a histogram's observations at or under `bound`, which must be a bucket."""
    assert sel.endswith("}"), "needs a selector to add the bucket to"
    bucket_sel = f'{sel[:-1]},le="{m.le_label(bound)}"}}'
    return (f"{sum_by(by, rate(spec, bucket_sel, window, 'bucket'))} / "
            f"{sum_by(by, rate(spec, sel, window, 'count'))}")


def or_zero(expr: str, by: str, sel: str) -> str:
    """`expr`, or 0 for each series of `by` a replica reports.

    NOTE: a Ray counter appears only with its first increment; without this, a panel of rare
    events (preemptions) stays "no data" exactly when all is well.
    """
    return f"({expr}) or ({sum_by(by, series(m.RUNNING, sel))} * 0)"


def ratio_of_rates(numerator: m.MetricSpec, denominator: m.MetricSpec, by: str, sel: str, window: str) -> str:
    """sum(rate(numerator)) / sum(rate(denominator)), with an absent numerator counting as 0."""
    top = sum_by(by, rate(numerator, sel, window))
    bottom = sum_by(by, rate(denominator, sel, window))
    return f"({top} or {bottom} * 0) / {bottom}"


def expert_rates(sel: str, window: str, by: str) -> str:
    return sum_by(by, rate(m.EXPERT_TOKENS, sel, window))


def expert_share(sel: str, window: str) -> str:
    """Each expert's share of its layer's routed tokens (0 to 1), summed over the selected replicas."""
    return (f"{expert_rates(sel, window, 'layer, expert')} / ignoring(expert) group_left "
            f"{expert_rates(sel, window, 'layer')}")


def expert_imbalance(sel: str, window: str) -> str:
    """Per tier and layer: tokens of the busiest expert over the mean per expert (1 = balanced)."""
    per_expert = expert_rates(sel, window, "tier, layer, expert")
    return f"max by (tier, layer) ({per_expert}) / avg by (tier, layer) ({per_expert})"
