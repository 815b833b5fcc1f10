"""The overview dashboard: one screen per deployment of mixtral-serve, organised by tier.

Every panel is filtered by the `tier` variable (and the model-replica panels by `replica`) and
splits its series by tier; each tier's latency targets from the config are drawn as dashed
lines, and the tiers with targets get their own SLO-attainment panels.
"""

from __future__ import annotations

from deployments import metrics as m
from dashboards import promql as q
from dashboards.grafana import TARGET_LEGEND_SUFFIX, Dashboard, Panel, Row, Target, Variable
from dashboards.tiers import Tier

UID = "mixtral-serve-overview"
DATASOURCE_NAME = "mixtral-serve Prometheus"
DATASOURCE_UID = "mixtral-serve-prometheus"
# NOTE: the share of tokens (or requests) that must meet a tier's target; the stat panels turn
# red under it and the alert rules fire on it.
SLO_OBJECTIVE = 0.99

WINDOW = "$__rate_interval"
TIER = q.selector(tier="~$tier")
REPLICA = q.selector(tier="~$tier", replica="~$replica")
_TARGET_TITLES: dict[m.TargetKind, str] = {"ttft": "TTFT", "itl": "ITL"}


def build(tiers: list[Tier]) -> Dashboard:
    return Dashboard(
        uid=UID,
        title="mixtral-serve overview",
        description="Traffic, latency against each tier's targets, engine, autoscaling and MoE expert load.",
        rows=[_traffic(), _latency(tiers), _slo(tiers), _throughput(tiers), _engine(), _lora(), _experts()],
        variables=[
            Variable("tier", "Tier", f"label_values({m.RUNNING.exported}, tier)"),
            Variable("replica", "Replica", f"label_values({m.RUNNING.exported}{TIER}, replica)"),
        ],
        datasource_name=DATASOURCE_NAME,
        datasource_uid=DATASOURCE_UID,
        tags=["mixtral-serve", "llm", "ray-serve"],
    )


def _per_s(spec: m.MetricSpec, by: str, sel: str = TIER) -> str:
    return q.sum_by(by, q.rate(spec, sel, WINDOW))


def _traffic() -> Row:
    return Row("Traffic and errors", [
        Panel("Requests by tier and status", [Target(_per_s(m.HTTP_REQUESTS, "tier, status_code"),
                                                     "{{tier}} {{status_code}}")],
              unit="reqps", description="Every API request the router answered (499: the client left first)."),
        Panel("Rejections by reason", [Target(_per_s(m.REJECTIONS, "tier, reason"), "{{tier}} {{reason}}")],
              unit="reqps",
              description="Requests refused or cut short by reason: validation, auth, overload, timeout, unavailable."),
        Panel("Client disconnects", [Target(_per_s(m.DISCONNECTS, "tier"), "{{tier}}")], unit="reqps",
              description="Requests whose client left before the response was complete (their work is aborted)."),
        Panel("Finished by reason", [Target(_per_s(m.REQUEST_SUCCESS, "tier, finished_reason", REPLICA),
                                            "{{tier}} {{finished_reason}}")],
              unit="reqps", width=12, description="Finished choices per second by finish reason."),
        Panel("Requests in the engine",
              [Target(q.sum_by("tier", q.series(m.RUNNING, REPLICA)), "{{tier}} running"),
               Target(q.sum_by("tier", q.series(m.WAITING, REPLICA)), "{{tier}} waiting")],
              width=12, description="Sequences running in the batch and waiting in the queue, summed over replicas."),
    ])


def _quantiles(spec: m.MetricSpec) -> list[Target]:
    return [Target(q.quantile(p, spec, "tier", REPLICA, WINDOW), f"{{{{tier}}}} p{round(p * 100)}")
            for p in (0.5, 0.9, 0.99)]


def _target_lines(tiers: list[Tier], kind: m.TargetKind) -> list[Target]:
    return [Target(f"vector({t.targets[kind]})", f"{t.name} {TARGET_LEGEND_SUFFIX}")
            for t in tiers if kind in t.targets]


def _latency(tiers: list[Tier]) -> Row:
    return Row("Latency", [
        Panel("Time to first token", _quantiles(m.TTFT) + _target_lines(tiers, "ttft"), unit="s", width=12,
              description="From the request reaching its replica to the first token; dashed: tier targets."),
        Panel("Inter-token latency", _quantiles(m.ITL) + _target_lines(tiers, "itl"), unit="s", width=12,
              description="Between two engine outputs of a request; dashed: tier targets."),
        Panel("End-to-end latency", _quantiles(m.E2E), unit="s", width=12,
              description="From the request reaching its replica to its last token."),
        Panel("Queue time", _quantiles(m.QUEUE_TIME), unit="s", width=12,
              description="Waiting in the engine before the first schedule."),
    ])


def _slo(tiers: list[Tier]) -> Row:
    panels = []
    for tier in tiers:
        for kind, target in tier.targets.items():
            spec = m.TTFT if kind == "ttft" else m.ITL
            sel = q.selector(tier=tier.name, replica="~$replica")
            panels.append(Panel(
                f"{tier.name}: {_TARGET_TITLES[kind]} within {target * 1000:g} ms",
                [Target(q.fraction_under(spec, target, sel, WINDOW), tier.name)],
                unit="percentunit", kind="stat", width=6, height=6, max=1,
                thresholds=[(None, "red"), (SLO_OBJECTIVE, "green")],
                description=f"Share of {'first tokens' if kind == 'ttft' else 'token gaps'} within the tier's "
                            f"target (from the histogram's {target:g} s bucket); green from "
                            f"{SLO_OBJECTIVE:.0%}.",
            ))
    return Row("SLO attainment", panels)


def _throughput(tiers: list[Tier]) -> Row:
    capacity = [Target(f"{q.series(m.CURRENT_REPLICAS, q.selector(tier=t.name))} * {t.target_queue_depth:g}",
                       f"{t.name} {TARGET_LEGEND_SUFFIX}") for t in tiers]
    return Row("Throughput and autoscaling", [
        Panel("Tokens per second",
              [Target(_per_s(m.GENERATION_TOKENS, "tier", REPLICA), "{{tier}} generated"),
               Target(_per_s(m.PROMPT_TOKENS, "tier", REPLICA), "{{tier}} prompt")],
              unit="short", width=12, description="Tokens generated and prompt tokens prefilled per second."),
        Panel("Tokens per request",
              [Target(q.quantile(p, spec, "tier", REPLICA, WINDOW), f"{{{{tier}}}} {what} p{round(p * 100)}")
               for spec, what in ((m.REQUEST_PROMPT_TOKENS, "prompt"), (m.REQUEST_GENERATION_TOKENS, "generated"))
               for p in (0.5, 0.9)],
              width=12, description="Prompt and generated tokens of finished requests (from histogram buckets)."),
        Panel("Replicas: desired vs running",
              [Target(f"max by (tier) ({q.series(m.DESIRED_REPLICAS, TIER)})", "{{tier}} desired"),
               Target(f"max by (tier) ({q.series(m.CURRENT_REPLICAS, TIER)})", "{{tier}} running"),
               Target(f"max by (deployment) ({q.SERVE_TARGET_REPLICAS}{q.selector(deployment='~$tier')})",
                      "{{deployment}} Serve target")],
              description="What the queue-depth policy asks for, the replicas running when it decided, and "
                          "Serve's target after its up/downscale delays.", width=12),
        Panel("Autoscaler queue signal",
              [Target(f"max by (tier) ({q.series(m.QUEUE_DEPTH, TIER)})", "{{tier}} queue depth"),
               Target(f"max by (tier) ({q.series(m.TTFT_BREACHES, TIER)})", "{{tier}} TTFT breaches"),
               *capacity],
              description="The queue the policy decided on (waiting + running over the tier's replicas) and "
                          "requests past the TTFT target; dashed: running replicas x target depth per replica.",
              width=12),
    ])


def _engine() -> Row:
    by_replica = "{{tier}} {{replica}}"
    return Row("Engine", [
        Panel("KV cache usage", [Target(f"max by (tier, replica) ({q.series(m.KV_USAGE, REPLICA)})", by_replica)],
              unit="percentunit", max=1, description="Fraction of each replica's KV cache blocks in use."),
        Panel("Preemptions", [Target(q.or_zero(_per_s(m.PREEMPTIONS, "tier", REPLICA), "tier", REPLICA),
                                     "{{tier}}")],
              unit="ops", description="Sequences preempted per second (KV cache full: their work is recomputed)."),
        Panel("Prefix cache hit rate",
              [Target(q.ratio_of_rates(m.PREFIX_HITS, m.PREFIX_QUERIES, "tier", REPLICA, WINDOW), "{{tier}}")],
              unit="percentunit", max=1, description="Prompt tokens found in the prefix cache over tokens looked up."),
        Panel("Prefix routing decisions",
              [Target(_per_s(m.PREFIX_ROUTING, "tier, decision"), "{{tier}} {{decision}}")], unit="reqps",
              description="Requests the router sent to the replica holding their longest prefix (affinity), to the "
                          "least loaded one because that replica was too busy (imbalanced), or with no prefix seen "
                          "before (no_match)."),
        Panel("Step time", [Target(f"max by (tier, replica) ({q.series(m.STEP_TIME, REPLICA)})", by_replica)],
              unit="s", description="Duration of each replica's latest engine step (sampled each second)."),
        Panel("Batch size",
              [Target(f"max by (tier, replica) ({q.series(m.BATCH_SIZE, REPLICA)})", f"{by_replica} sequences"),
               Target(f"max by (tier, replica) ({q.series(m.BATCH_TOKENS, REPLICA)})", f"{by_replica} tokens")],
              description="Sequences and tokens in each replica's latest engine step (sampled each second)."),
        Panel("Engine steps", [Target(_per_s(m.STEPS, "tier, replica", REPLICA), by_replica)], unit="ops",
              description="Engine steps per second."),
    ])


def _lora() -> Row:
    return Row("LoRA adapters", [
        Panel("Requests by adapter", [Target(_per_s(m.LORA_REQUESTS, "tier, adapter", REPLICA), "{{tier}} {{adapter}}")],
              unit="reqps", description="Requests per second that ran with each LoRA adapter (base-model ones "
                                        "are not counted here)."),
        Panel("Generated tokens by adapter",
              [Target(_per_s(m.LORA_GENERATION_TOKENS, "tier, adapter", REPLICA), "{{tier}} {{adapter}}")],
              unit="short", description="Tokens per second generated with each LoRA adapter."),
        Panel("Resident adapters",
              [Target(f"max by (tier, replica) ({q.series(m.LORA_RESIDENT, REPLICA)})", "{{tier}} {{replica}}"),
               Target(q.or_zero(_per_s(m.LORA_SLOT_LOADS, "tier", REPLICA), "tier", REPLICA),
                      "{{tier}} slot loads/s")],
              description="Adapters in each replica's device slots, and adapters written into a slot per second "
                          "(steadily high: more adapters in use than slots, engine.lora.max_loras)."),
        Panel("Adapter read time (mean since start)",
              [Target(f"{q.sum_by('tier', q.series(m.LORA_READ_TIME, REPLICA))} / "
                      f"{q.sum_by('tier', q.series(m.LORA_READS, REPLICA))}", "{{tier}} mean")],
              unit="s", description="Mean time to read an adapter from disk, over every read since the replicas "
                                    "started (reads are rare: first use, or after eviction from host memory); the "
                                    "first request for an adapter waits so long."),
    ])


def _experts() -> Row:
    return Row("MoE experts", [
        Panel("Expert load (share of each layer's tokens)",
              [Target(q.expert_share(REPLICA, WINDOW), "L{{layer}} E{{expert}}")],
              kind="heatmap", unit="percentunit", width=16, height=12,
              description="One row per layer and expert: the expert's share of the tokens its layer routed "
                          "(top-2 of 8: 0.25 each when balanced)."),
        Panel("Expert imbalance (busiest / mean)",
              [Target(q.expert_imbalance(REPLICA, WINDOW), "{{tier}} layer {{layer}}")],
              width=8, height=12, min=1,
              description="Per layer: tokens of the busiest expert over the mean per expert (1 = balanced)."),
    ])
