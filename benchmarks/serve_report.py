"""`bench serve` results: typed per-request records, the statistics of a run, the best load of a
sweep, and how they are shown (a rich table, a JSON file, matplotlib PNGs).

Conventions follow vLLM's `bench serve`: TTFT is the time to the first streamed chunk that
carries text, ITL every gap between such chunks (pooled over requests), TPOT
(E2E - TTFT) / (output tokens - 1) per request, and goodput the requests per second that met
every SLO. AIME's benchmark adds per-session tokens/s (the mean over requests of output tokens
/ E2E: what one user sees) next to the output tokens/s of all sessions together.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, computed_field, field_serializer

from benchmarks.serve_cost import Cost, Pricing, cost_of

Status = Literal["ok", "failed", "rejected"]
SLO_KEYS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")  # itl_ms: every gap of the request
PNG_NAMES = ("latency_cdf", "tokens_over_time", "sweep")


class LoadLevel(BaseModel):
    kind: Literal["concurrency", "request_rate"]
    value: float
    max_concurrency: int | None = None  # open loop only: at most this many requests in flight

    @property
    def short(self) -> str:
        return f"c={self.value:g}" if self.kind == "concurrency" else f"{self.value:g}/s"

    @property
    def label(self) -> str:
        if self.kind == "concurrency":
            return f"concurrency {self.value:g}"
        cap = f" (max {self.max_concurrency} in flight)" if self.max_concurrency else ""
        return f"{self.value:g} req/s{cap}"


class RequestResult(BaseModel):
    index: int
    scheduled_s: float | None = None  # open loop: the planned Poisson arrival, from the run's start
    start_s: float  # when the request was sent, from the run's start
    status: Status
    error: str | None = None
    input_tokens: int | None = None  # from the server's usage, else the workload's estimate
    cached_tokens: int | None = None  # prompt tokens the server's prefix cache held (its usage, where given)
    output_tokens: int = 0  # from the server's usage, else the number of text chunks
    ttft_ms: float | None = None
    e2e_ms: float  # to the end of the stream (to the error for a failed request)
    itl_ms: list[float] = []

    @field_serializer("itl_ms")
    def _round_gaps(self, gaps: list[float]) -> list[float]:
        return [round(g, 3) for g in gaps]  # microseconds are plenty; halves the JSON

    @computed_field  # type: ignore[prop-decorator]
    @property
    def tpot_ms(self) -> float | None:
        if self.status != "ok" or self.ttft_ms is None or self.output_tokens < 2:
            return None
        return (self.e2e_ms - self.ttft_ms) / (self.output_tokens - 1)

    def meets(self, slo: dict[str, float]) -> bool:
        """Succeeded and within every SLO (a one-token answer has no TPOT and passes that one)."""
        if self.status != "ok":
            return False
        values = {"ttft_ms": self.ttft_ms, "tpot_ms": self.tpot_ms, "e2e_ms": self.e2e_ms,
                  "itl_ms": max(self.itl_ms, default=None)}
        return all((v := values[k]) is None or v <= limit for k, limit in slo.items())


class Dist(BaseModel):
    mean: float
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> Dist | None:
        if not values:
            return None
        p50, p90, p99 = np.percentile(values, [50, 90, 99]).tolist()
        return cls(mean=float(np.mean(values)), p50=p50, p90=p90, p99=p99, max=float(np.max(values)))


class TimePoint(BaseModel):
    t_s: float  # bin centre, from the run's start
    output_tok_s: float
    in_flight: int


class RunResult(BaseModel):
    tier: str | None
    base_url: str
    model: str
    load: LoadLevel
    duration_s: float
    issued: int  # = successful + failed + rejected
    successful: int
    failed: int
    rejected: int  # HTTP 429 / 503: the server shed load
    warmup_failed: int
    input_tokens: int
    output_tokens: int
    # Prompt tokens the server found in its prefix cache over all prompt tokens (servers that report
    # usage.prompt_tokens_details.cached_tokens: mixtral-serve, vLLM); None where none was reported.
    prefix_cache_hit_rate: float | None = None
    request_throughput: float  # successful requests / s
    output_tok_s: float  # output tokens of all sessions / s (AIME's "total tokens/s")
    total_tok_s: float  # input + output tokens / s (vLLM's "total token throughput")
    per_session_tok_s: float | None
    ttft_ms: Dist | None
    tpot_ms: Dist | None
    itl_ms: Dist | None
    e2e_ms: Dist | None
    slo: dict[str, float]
    goodput_req_s: float
    slo_attainment: float  # share of issued requests that met every SLO
    meets_slo: bool
    errors: dict[str, int]
    cost: Cost | None = None  # with --gpu-hour-usd (benchmarks/serve_cost.py)
    timeline: list[TimePoint]
    requests: list[RequestResult]


class TierBest(BaseModel):
    """The highest load of a sweep up to which a tier met its SLOs at every level (None: not
    even the lightest). A level past the first failing one does not count: a pass there is
    noise, not capacity."""

    tier: str | None
    load: LoadLevel | None
    output_tok_s: float | None = None
    goodput_req_s: float | None = None
    ttft_p99_ms: float | None = None
    tpot_p99_ms: float | None = None


class BenchResult(BaseModel):
    config: dict[str, Any]
    runs: list[RunResult]
    best: list[TierBest]  # sweeps only


def _timeline(records: list[RequestResult], duration_s: float) -> list[TimePoint]:
    """Output tokens/s and requests in flight over time, in up to 40 bins.

    A chunk may carry several tokens (servers that batch their stream), so each request's
    tokens are spread evenly over its text chunks.
    """
    if duration_s <= 0:
        return []
    width = max(duration_s / 40, 0.05)
    edges = np.arange(0.0, duration_s + width, width)
    times: list[float] = []
    weights: list[float] = []
    for r in records:
        if r.status != "ok" or r.ttft_ms is None:
            continue
        chunk_times = r.start_s + (r.ttft_ms + np.concatenate([[0.0], np.cumsum(r.itl_ms)])) / 1000
        times.extend(chunk_times.tolist())
        weights.extend([r.output_tokens / len(chunk_times)] * len(chunk_times))
    tokens, _ = np.histogram(times, bins=edges, weights=weights)
    centres = (edges[:-1] + edges[1:]) / 2
    spans = [(r.start_s, r.start_s + r.e2e_ms / 1000) for r in records]
    return [TimePoint(t_s=float(c), output_tok_s=float(n / width), in_flight=sum(a <= c < b for a, b in spans))
            for c, n in zip(centres, tokens)]


def summarize(records: list[RequestResult], *, tier: str | None, base_url: str, model: str, load: LoadLevel,
              duration_s: float, warmup_failed: int, slo: dict[str, float], slo_attainment: float,
              pricing: Pricing | None = None) -> RunResult:
    ok = [r for r in records if r.status == "ok"]
    counts = Counter(r.status for r in records)
    duration = max(duration_s, 1e-9)
    input_tokens = sum(r.input_tokens or 0 for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    reported = [r for r in ok if r.cached_tokens is not None and r.input_tokens]
    good = sum(r.meets(slo) for r in records)
    attainment = good / len(records) if records else 0.0
    return RunResult(
        tier=tier, base_url=base_url, model=model, load=load, duration_s=duration_s,
        issued=len(records), successful=counts["ok"], failed=counts["failed"], rejected=counts["rejected"],
        warmup_failed=warmup_failed, input_tokens=input_tokens, output_tokens=output_tokens,
        prefix_cache_hit_rate=(sum(r.cached_tokens or 0 for r in reported) / sum(r.input_tokens or 0 for r in reported)
                               if reported else None),
        request_throughput=len(ok) / duration,
        output_tok_s=output_tokens / duration,
        total_tok_s=(input_tokens + output_tokens) / duration,
        per_session_tok_s=float(np.mean([r.output_tokens / (r.e2e_ms / 1000) for r in ok])) if ok else None,
        ttft_ms=Dist.of([r.ttft_ms for r in ok if r.ttft_ms is not None]),
        tpot_ms=Dist.of([t for r in ok if (t := r.tpot_ms) is not None]),
        itl_ms=Dist.of([g for r in ok for g in r.itl_ms]),
        e2e_ms=Dist.of([r.e2e_ms for r in ok]),
        slo=slo, goodput_req_s=good / duration, slo_attainment=attainment,
        meets_slo=bool(records) and attainment >= slo_attainment,
        errors=dict(Counter(r.error for r in records if r.error).most_common(10)),
        cost=cost_of(records, duration_s, pricing, tier) if pricing is not None else None,
        timeline=_timeline(records, duration_s),
        requests=records,
    )


def pick_best(runs: list[RunResult]) -> list[TierBest]:
    """Per tier, in run order (ascending load): the last level before the first that failed its SLOs."""
    best: dict[str | None, TierBest] = {}
    broken: set[str | None] = set()
    for run in sorted(runs, key=lambda r: r.load.value):
        best.setdefault(run.tier, TierBest(tier=run.tier, load=None))
        if not run.meets_slo:
            broken.add(run.tier)
        elif run.tier not in broken:
            best[run.tier] = TierBest(
                tier=run.tier, load=run.load, output_tok_s=run.output_tok_s, goodput_req_s=run.goodput_req_s,
                ttft_p99_ms=run.ttft_ms.p99 if run.ttft_ms else None,
                tpot_p99_ms=run.tpot_ms.p99 if run.tpot_ms else None,
            )
    return [best[t] for t in dict.fromkeys(r.tier for r in runs)]


# ---- presentation ----------------------------------------------------------------------------
def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def _slo_text(slo: dict[str, float]) -> str:
    return ", ".join(f"{k.removesuffix('_ms').upper()} <= {v:g} ms" for k, v in slo.items()) or "no SLO"


def _run_name(run: RunResult) -> str:
    return f"{run.tier + ' ' if run.tier else ''}{run.load.label}"


def print_report(result: BenchResult) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    # Piped into a file or CI log, rich would squeeze the tables into 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 200)
    if len(result.runs) == 1:
        run = result.runs[0]
        table = Table(title=f"bench serve: {run.base_url} ({run.model}), {_run_name(run)}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        rows = [
            ("successful / failed / rejected", f"{run.successful} / {run.failed} / {run.rejected}"),
            ("duration (s)", _f(run.duration_s, 2)),
            ("input / output tokens", f"{run.input_tokens} / {run.output_tokens}"),
            ("requests/s", _f(run.request_throughput, 2)), ("output tokens/s (all sessions)", _f(run.output_tok_s)),
            ("total tokens/s (input + output)", _f(run.total_tok_s)),
            ("per-session tokens/s (mean)", _f(run.per_session_tok_s)),
        ]
        if run.prefix_cache_hit_rate is not None:
            rows.append(("prefix cache hit rate (prompt tokens)", f"{run.prefix_cache_hit_rate:.1%}"))
        for name in result.config.get("percentile_metrics") or ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            d: Dist | None = getattr(run, name)
            rows.append((f"{name[:-3].upper()} ms mean / p50 / p90 / p99",
                         " / ".join(_f(getattr(d, k) if d else None) for k in ("mean", "p50", "p90", "p99"))))
        rows.append((f"goodput req/s ({_slo_text(run.slo)})",
                     f"{_f(run.goodput_req_s, 2)} ({run.slo_attainment:.0%} met)"))
        if (cost := run.cost) is not None:
            blend = ":".join(f"{v:g}" for v in result.config["pricing"]["blend"])
            rows.append((f"$ per 1M tokens: prompt / generated / blended {blend}",
                         " / ".join(_f(v, 3) for v in (cost.usd_per_m_prompt, cost.usd_per_m_generated,
                                                        cost.usd_per_m_blended))))
        for row in rows:
            table.add_row(*row)
        console.print(table)
    else:
        table = Table(title="bench serve")
        for col in ("tier", "load", "ok/fail/rej", "req/s", "out tok/s", "session tok/s", "TTFT p50/p99 ms",
                    "TPOT p50/p99 ms", "ITL p99 ms", "E2E p50 ms", "goodput", "SLO"):
            table.add_column(col, justify="left" if col in ("tier", "load") else "right")
        priced = result.config.get("pricing") is not None
        if priced:
            table.add_column("$/1M prompt/gen/blend", justify="right")
        for run in result.runs:
            ttft, tpot = run.ttft_ms, run.tpot_ms
            table.add_row(
                run.tier or "-", run.load.short, f"{run.successful}/{run.failed}/{run.rejected}",
                _f(run.request_throughput, 2), _f(run.output_tok_s), _f(run.per_session_tok_s),
                f"{_f(ttft.p50 if ttft else None)}/{_f(ttft.p99 if ttft else None)}",
                f"{_f(tpot.p50 if tpot else None)}/{_f(tpot.p99 if tpot else None)}",
                _f(run.itl_ms.p99 if run.itl_ms else None), _f(run.e2e_ms.p50 if run.e2e_ms else None),
                _f(run.goodput_req_s, 2), "yes" if run.meets_slo else "no",
                *([" / ".join(_f(v, 3) for v in (run.cost.usd_per_m_prompt, run.cost.usd_per_m_generated,
                                                  run.cost.usd_per_m_blended))] if priced and run.cost else []),
            )
        console.print(table)
    for run in result.runs:
        for message, count in run.errors.items():
            console.print(f"[red]error[/red] ({escape(_run_name(run))}) x{count}: {escape(message)}")
    if result.best:
        table = Table(title="best load within the SLOs")
        for col in ("tier", "load", "out tok/s", "goodput req/s", "TTFT p99 ms", "TPOT p99 ms"):
            table.add_column(col)
        for b in result.best:
            table.add_row(b.tier or "-", b.load.label if b.load else "none met the SLOs", _f(b.output_tok_s),
                          _f(b.goodput_req_s, 2), _f(b.ttft_p99_ms), _f(b.tpot_p99_ms))
        console.print(table)


def write_outputs(result: BenchResult, out: Path) -> list[Path]:
    """`out` (a .json path, or a folder for result.json) plus PNGs named after it; returns them."""
    # NOTE: Figure, not pyplot: no GUI backend and no global figure state in the caller's process.
    from matplotlib.figure import Figure

    json_path = out if out.suffix == ".json" else out / "result.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(result.model_dump_json(indent=1))
    png = {name: json_path.with_name(f"{json_path.stem}_{name}.png") for name in PNG_NAMES}
    plots = [(_plot_cdfs, png["latency_cdf"]), (_plot_timeline, png["tokens_over_time"])]
    if result.best:
        plots.append((_plot_sweep, png["sweep"]))
    for plot, path in plots:
        fig = Figure(figsize=(11, 8))
        plot(fig, result)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    return [json_path, *(path for _, path in plots)]


def _plot_cdfs(fig: Any, result: BenchResult) -> None:
    metrics = {"ttft_ms": "TTFT", "tpot_ms": "TPOT", "itl_ms": "ITL", "e2e_ms": "E2E latency"}
    slo = result.runs[0].slo if result.runs else {}
    for ax, (key, title) in zip(fig.subplots(2, 2).flat, metrics.items()):
        for run in result.runs:
            ok = [r for r in run.requests if r.status == "ok"]
            values = ([g for r in ok for g in r.itl_ms] if key == "itl_ms"
                      else [v for r in ok if (v := getattr(r, key)) is not None])
            if values:
                ax.plot(np.sort(values), np.arange(1, len(values) + 1) / len(values), label=_run_name(run))
        if key in slo:
            ax.axvline(slo[key], color="red", linestyle=":", label="SLO")
        ax.set(title=f"{title} CDF", xlabel="ms", ylabel="share of gaps" if key == "itl_ms" else "share of requests")
        _finish(ax)


def _plot_timeline(fig: Any, result: BenchResult) -> None:
    from matplotlib.ticker import MaxNLocator

    top, bottom = fig.subplots(2, 1, sharex=True)
    for run in result.runs:
        t = [p.t_s for p in run.timeline]
        top.plot(t, [p.output_tok_s for p in run.timeline], label=_run_name(run))
        bottom.plot(t, [p.in_flight for p in run.timeline], drawstyle="steps-mid", label=_run_name(run))
    top.set(title="output tokens/s over time", ylabel="tokens/s")
    bottom.set(xlabel="seconds since the run started", ylabel="requests in flight")
    bottom.yaxis.set_major_locator(MaxNLocator(integer=True))
    # Both axes from 0: a range of 15-16 in flight would make a run's tail look like a collapse.
    top.set_ylim(bottom=0)
    bottom.set_ylim(bottom=0)
    _finish(top)
    _finish(bottom)


def _plot_sweep(fig: Any, result: BenchResult) -> None:
    """Throughput and p99 latencies against load, per tier; filled markers met the SLOs."""
    top, bottom = fig.subplots(2, 1, sharex=True)
    for tier in dict.fromkeys(r.tier for r in result.runs):
        runs = [r for r in result.runs if r.tier == tier]
        name = tier or "server"
        x = [r.load.value for r in runs]
        (line,) = top.plot(x, [r.output_tok_s for r in runs], marker="o", mfc="white", label=name)
        color = line.get_color()
        met = [r for r in runs if r.meets_slo]
        top.scatter([r.load.value for r in met], [r.output_tok_s for r in met], color=color, zorder=3)
        best = next((b for b in result.best if b.tier == tier and b.load is not None), None)
        if best is not None and best.load is not None:
            top.scatter([best.load.value], [best.output_tok_s], marker="*", s=250, color=color, edgecolor="black",
                        zorder=4)
        bottom.plot(x, [r.ttft_ms.p99 if r.ttft_ms else np.nan for r in runs], marker="o", color=color,
                    label=f"{name} TTFT p99")
        bottom.plot(x, [r.tpot_ms.p99 if r.tpot_ms else np.nan for r in runs], marker="s", linestyle="--",
                    color=color, label=f"{name} TPOT p99")
    for key in ("ttft_ms", "tpot_ms"):
        if key in result.runs[0].slo:
            bottom.axhline(result.runs[0].slo[key], color="red", linestyle=":", linewidth=1)
    kind = result.runs[0].load.kind
    top.set(title="output tokens/s vs load (filled: met the SLOs, star: best)", ylabel="output tokens/s")
    bottom.set(xlabel="concurrency" if kind == "concurrency" else "request rate (req/s)", ylabel="ms (p99)",
               yscale="log")
    _finish(top)
    _finish(bottom)


def _finish(ax: Any) -> None:
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
