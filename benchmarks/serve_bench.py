"""`mixtral-serve bench serve`: load-test any OpenAI-compatible server (ours, vLLM, a hosted API).

    mixtral-serve bench serve --base-url http://127.0.0.1:8000/v1 --concurrency 8 --num-requests 64
    mixtral-serve bench serve --tier latency --tier throughput --sweep concurrency=1,2,4,8 \\
        --slo ttft_ms=500 --slo tpot_ms=50 --out runs/sweep/result.json

Streams `/completions` (or `/chat/completions` with `--endpoint chat`) under a closed loop of
`--concurrency` users or open-loop Poisson arrivals at `--request-rate`, and reports TTFT, TPOT,
ITL, E2E, tokens/s (all sessions and per session) and goodput under SLOs; a `--sweep` finds
the highest load each tier serves within its SLOs. Definitions: benchmarks/serve_report.py.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Literal, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from benchmarks.serve_cost import Pricing, gpus_per_tier
from benchmarks.serve_report import SLO_KEYS, BenchResult, LoadLevel, RunResult, pick_best, print_report, write_outputs

DEFAULT_NUM_REQUESTS = 64
SweepKind = Literal["concurrency", "request_rate"]


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_url: str = "http://127.0.0.1:8000/v1"  # the OpenAI base URL (/v1 is added when missing, as vLLM's)
    tiers: list[str] = []  # mixtral-serve tiers: each runs against {host}/{tier}/v1
    endpoint: Literal["completions", "chat"] = "completions"
    model: str | None = None  # None: the first model GET {base_url}/models lists
    api_key: str | None = None
    concurrency: int | None = Field(None, ge=1)  # closed loop; with request_rate, a cap on requests in flight
    request_rate: float | None = Field(None, gt=0)  # open loop (Poisson), may be inf
    num_requests: int | None = Field(None, ge=1)  # None: 64, or no limit when `duration_s` is set
    duration_s: float | None = Field(None, gt=0)  # no new requests after this
    warmup: int = Field(1, ge=0)
    seed: int = Field(0, ge=0)
    input_len: int | Literal["max"] = 128  # "max": fill the context (server's max_model_len)
    input_len_range: tuple[int, int] | None = None
    output_len: int = Field(128, ge=1)
    output_len_range: tuple[int, int] | None = None
    dataset: Path | None = None  # JSONL {"prompt", "max_tokens"}
    # Multi-turn chat: (conversations, turns); each turn sends the whole history plus a new question
    # (input_len words), the conversations run at once. Replaces the load levels.
    multi_turn: tuple[int, int] | None = None
    system_prompt_len: int = Field(0, ge=0)  # words of a system prompt every conversation shares
    think_time_s: float = Field(0.0, ge=0)  # mean pause of a user between an answer and the next question
    max_model_len: int | None = Field(None, ge=2)
    ignore_eos: bool = True
    temperature: float = Field(0.0, ge=0)
    timeout_s: float = Field(300.0, gt=0)  # per request, whole stream
    slo: dict[str, float] = {}
    slo_attainment: float = Field(0.9, gt=0, le=1)  # share of requests that must meet the SLOs
    sweep: tuple[SweepKind, list[float]] | None = None
    out: Path | None = None
    progress: bool = True
    percentile_metrics: list[str] | None = None  # which latency rows a single run's table shows
    pricing: Pricing | None = None  # $ per 1M tokens in the report (benchmarks/serve_cost.py)

    @field_validator("base_url")
    @classmethod
    def _v1(cls, url: str) -> str:
        url = url.rstrip("/")
        return url if url.endswith("/v1") else f"{url}/v1"

    @model_validator(mode="after")
    def _check(self) -> BenchConfig:
        if self.percentile_metrics is not None and (bad := set(self.percentile_metrics) - set(SLO_KEYS)):
            raise ValueError(f"unknown percentile metric(s) {sorted(bad)}; known: ttft, tpot, itl, e2el")
        if unknown := set(self.slo) - set(SLO_KEYS):
            raise ValueError(f"unknown SLO {sorted(unknown)}; known: {', '.join(SLO_KEYS)}")
        for name in ("input_len_range", "output_len_range"):
            lo_hi = getattr(self, name)
            if lo_hi is not None and not 1 <= lo_hi[0] <= lo_hi[1]:
                raise ValueError(f"{name} must be a:b with 1 <= a <= b, got {lo_hi}")
        if isinstance(self.input_len, int) and self.input_len < 1:
            raise ValueError("input_len must be >= 1 or 'max'")
        if self.sweep is not None:
            kind, values = self.sweep
            if not values or min(values) <= 0 or (kind == "concurrency" and any(v != int(v) for v in values)):
                raise ValueError(f"sweep {kind} needs positive values{' (integers)' if kind == 'concurrency' else ''}")
            if kind == "concurrency" and self.request_rate is not None:
                raise ValueError("a concurrency sweep runs closed loops: drop --request-rate")
            self.sweep = (kind, sorted(values))
        if self.multi_turn is not None and (self.sweep or self.request_rate or self.concurrency or self.dataset):
            raise ValueError("--multi-turn sets the load itself (its conversations run at once): drop "
                             "--sweep, --request-rate, --concurrency and --dataset")
        if self.multi_turn is not None and min(self.multi_turn) < 1:
            raise ValueError(f"multi_turn must be N:T with N, T >= 1, got {self.multi_turn}")
        if self.request_rate == float("inf") and self.num_requests is None:
            raise ValueError("an infinite request rate sends everything at once: give --num-requests")
        if self.num_requests is None and self.duration_s is None:
            self.num_requests = DEFAULT_NUM_REQUESTS
        return self

    def levels(self) -> list[LoadLevel]:
        if self.multi_turn is not None:
            return [LoadLevel(kind="concurrency", value=self.multi_turn[0])]
        if self.sweep is not None:
            kind, values = self.sweep
            cap = self.concurrency if kind == "request_rate" else None
            return [LoadLevel(kind=kind, value=v, max_concurrency=cap) for v in values]
        if self.request_rate is not None:
            return [LoadLevel(kind="request_rate", value=self.request_rate, max_concurrency=self.concurrency)]
        return [LoadLevel(kind="concurrency", value=self.concurrency or 1)]


def tier_url(base_url: str, tier: str | None) -> str:
    """`--tier T` on our server: {host}/T/v1 (a trailing /v1 of --base-url is dropped first)."""
    base = base_url.rstrip("/")
    return base if tier is None else f"{base.removesuffix('/v1')}/{tier}/v1"


async def run_benchmark(config: BenchConfig) -> BenchResult:
    """Every tier (or the base URL) at every load level; writes `config.out` when set."""
    # NOTE: imported here: the CLI imports this module for every command, and the client's modules
    # (aiohttp, numpy, tqdm) add ~0.1 s to each start-up.
    import aiohttp

    from benchmarks.serve_load import (
        Conversations,
        HTTPStatusError,
        Sender,
        Workload,
        client_session,
        list_model,
        run_conversations,
        run_load,
    )
    from benchmarks.serve_report import summarize

    runs: list[RunResult] = []
    tiers: list[str | None] = [*config.tiers] or [None]
    for tier in tiers:
        url = tier_url(config.base_url, tier)
        async with client_session(config.api_key, config.timeout_s) as session:
            model, max_len = config.model, config.max_model_len
            if model is None or (config.input_len == "max" and max_len is None):
                try:
                    listed, listed_len = await list_model(session, url)
                except (aiohttp.ClientError, HTTPStatusError, ValueError) as err:
                    raise ValueError(f"cannot list the models at {url}/models ({err}); pass --model") from None
                model, max_len = model or listed, max_len or listed_len
            workload = Workload(
                input_len=_input_len(config, max_len), output_len=config.output_len,
                input_len_range=config.input_len_range, output_len_range=config.output_len_range,
                dataset=config.dataset, seed=config.seed,
            )
            send = Sender(session, url, model, config.endpoint, config.ignore_eos, config.temperature,
                          config.timeout_s)
            for level in config.levels():
                name = f"{tier + ' ' if tier else ''}{level.label}"
                progress = name if config.progress else None
                if config.multi_turn is not None:
                    conversations = Conversations(*config.multi_turn, config.system_prompt_len, config.think_time_s)
                    load = await run_conversations(send, workload, conversations, progress=progress)
                else:
                    load = await run_load(send, workload, level, num_requests=config.num_requests,
                                          duration_s=config.duration_s, warmup=config.warmup, seed=config.seed,
                                          progress=progress)
                runs.append(summarize(load.records, tier=tier, base_url=url, model=model, load=level,
                                      duration_s=load.duration_s, warmup_failed=load.warmup_failed,
                                      slo=config.slo, slo_attainment=config.slo_attainment,
                                      pricing=config.pricing))
    result = BenchResult(config=config.model_dump(mode="json", exclude={"api_key"}), runs=runs,
                         best=pick_best(runs) if config.sweep else [])
    if config.out is not None:
        write_outputs(result, config.out)
    return result


def _input_len(config: BenchConfig, max_model_len: int | None) -> int:
    if config.input_len != "max":
        return config.input_len
    if max_model_len is None:
        raise ValueError("--input-len max needs the context length: the server's model card has none, "
                         "pass --max-model-len")
    longest_output = config.output_len_range[1] if config.output_len_range else config.output_len
    # Headroom for chat templates and words a foreign tokenizer splits in two.
    length = max_model_len - longest_output - 16 - max_model_len // 100
    if length < 1:
        raise ValueError(f"no room for a prompt: max_model_len {max_model_len}, output {longest_output} tokens")
    return length


# ---- command line ----------------------------------------------------------------------------
def _pair(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected a:b, got {text!r}")
    return int(lo), int(hi)


def _ratio(text: str) -> tuple[float, float]:
    p, sep, g = text.partition(":")
    try:
        ratio = float(p), float(g)
    except ValueError:
        ratio = (0.0, 0.0)
    if not sep or min(ratio) < 0 or sum(ratio) <= 0:
        raise argparse.ArgumentTypeError(f"expected P:G such as 4:1, got {text!r}")
    return ratio


def _slo(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    if not sep or key not in SLO_KEYS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(k + '=MS' for k in SLO_KEYS)}, got {text!r}")
    return key, float(value)


_VLLM_METRICS = {"ttft": "ttft_ms", "tpot": "tpot_ms", "itl": "itl_ms", "e2el": "e2e_ms"}


def _goodput(text: str) -> tuple[str, float]:
    key, sep, value = text.partition(":")
    if not sep or key not in _VLLM_METRICS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(k + ':MS' for k in _VLLM_METRICS)}, got {text!r}")
    return _VLLM_METRICS[key], float(value)


def _metrics(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if bad := [n for n in names if n not in _VLLM_METRICS]:
        raise argparse.ArgumentTypeError(f"unknown metric(s) {bad}; known: {', '.join(_VLLM_METRICS)}")
    return [_VLLM_METRICS[n] for n in names]


def _sweep(text: str) -> tuple[SweepKind, list[float]]:
    key, sep, values = text.partition("=")
    kind = key.replace("-", "_")
    if not sep or kind not in ("concurrency", "request_rate"):
        raise argparse.ArgumentTypeError(f"expected concurrency=1,2,4 or request-rate=1,2,4, got {text!r}")
    return cast(SweepKind, kind), [float(v) for v in values.split(",") if v]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="OpenAI base URL (/v1 added when missing)")
    p.add_argument("--tier", action="append", default=[],
                   help="mixtral-serve tier(s) on the --base-url host (repeat or comma-separate; each runs)")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--model", help="model id (default: the first one GET {base_url}/models lists)")
    p.add_argument("--api-key", help="sent as a Bearer token")
    load = p.add_argument_group("load")
    load.add_argument("--concurrency", "--max-concurrency", type=int, help="closed loop of N users (default 1); with --request-rate "
                                                      "a cap on requests in flight")
    load.add_argument("--request-rate", type=float, help="open loop: Poisson arrivals per second (inf: all at once)")
    load.add_argument("--num-requests", "--num-prompts", type=int, help=f"default {DEFAULT_NUM_REQUESTS}, unlimited with --duration")
    load.add_argument("--duration", type=float, help="seconds: no new requests after that")
    load.add_argument("--warmup", type=int, default=1, help="unmeasured requests first")
    load.add_argument("--seed", type=int, default=0, help="prompts, lengths and arrival times")
    load.add_argument("--sweep", type=_sweep, help="concurrency=1,2,4,8 or request-rate=1,2,4: one run per level")
    work = p.add_argument_group("workload")
    work.add_argument("--input-len", "--random-input-len", default="128", help="prompt tokens (approximate), or 'max' to fill the context")
    work.add_argument("--input-len-range", type=_pair, metavar="A:B", help="uniform random prompt lengths")
    work.add_argument("--output-len", "--random-output-len", type=int, default=128)
    work.add_argument("--output-len-range", type=_pair, metavar="A:B")
    work.add_argument("--dataset", type=Path, help='JSONL rows {"prompt": ..., "max_tokens": ...}')
    work.add_argument("--multi-turn", type=_pair, metavar="N:T",
                      help="N conversations of T chat turns at once, each turn the whole history plus a new "
                           "question of --input-len words (reports the prefix cache hit rate)")
    work.add_argument("--system-prompt-len", type=int, default=0, help="with --multi-turn: words of a shared "
                                                                         "system prompt")
    work.add_argument("--think-time", type=float, default=0.0, help="with --multi-turn: mean seconds a user pauses "
                                                                     "between an answer and the next question")
    work.add_argument("--max-model-len", type=int, help="context length for --input-len max (default: the "
                                                         "server's model card)")
    work.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                      help="ask for exact output lengths (vLLM/mixtral-serve extension)")
    work.add_argument("--temperature", type=float, default=0.0)
    work.add_argument("--timeout", type=float, default=300.0, help="seconds per request, whole stream")
    rep = p.add_argument_group("report")
    rep.add_argument("--slo", type=_slo, action="append", default=[], metavar="KEY=MS",
                     help=f"latency objective, one of {', '.join(SLO_KEYS)} (repeatable)")
    rep.add_argument("--slo-attainment", type=float, default=0.9,
                     help="share of requests that must meet the SLOs for a load level to pass")
    rep.add_argument("--goodput", nargs="+", type=_goodput, default=[], metavar="KEY:MS",
                     help="vLLM's spelling of --slo: ttft:MS, tpot:MS, itl:MS, e2el:MS")
    rep.add_argument("--out", type=Path, help="result JSON path (or folder); PNG plots are written beside it")
    rep.add_argument("--save-result", action="store_true", help="as vLLM: write the result JSON (and plots) to "
                     "--result-dir/--result-filename")
    rep.add_argument("--result-dir", type=Path, default=Path("."))
    rep.add_argument("--result-filename", help="default: bench-serve-<time>.json")
    rep.add_argument("--percentile-metrics", type=_metrics, help="comma-separated rows of the latency table "
                     "(ttft,tpot,itl,e2el; default: all)")
    rep.add_argument("--no-progress", "--disable-tqdm", action="store_true")
    cost = p.add_argument_group("cost", "$ per 1M tokens from the measured throughput (benchmarks/serve_cost.py)")
    cost.add_argument("--gpu-hour-usd", type=float, help="price of one GPU-hour; turns the cost columns on")
    cost.add_argument("--config", type=Path, help="Serve config: each tier's GPUs per replica (deployment.num_gpus)")
    cost.add_argument("--gpus-per-replica", type=float, default=1.0,
                      help="GPUs of one replica where --config does not say (a CPU-only machine: 1)")
    cost.add_argument("--replicas", type=int, default=1, help="replicas serving each tier during the run")
    cost.add_argument("--price-blend", type=_ratio, default=(4.0, 1.0), metavar="P:G",
                      help="prompt:generated token ratio of the blended price (default 4:1, chat)")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        base_url=args.base_url, tiers=[t for arg in args.tier for t in arg.split(",") if t],
        endpoint=args.endpoint, model=args.model, api_key=args.api_key,
        concurrency=args.concurrency, request_rate=args.request_rate, num_requests=args.num_requests,
        duration_s=args.duration, warmup=args.warmup, seed=args.seed,
        input_len="max" if args.input_len == "max" else int(args.input_len), input_len_range=args.input_len_range,
        output_len=args.output_len, output_len_range=args.output_len_range, dataset=args.dataset,
        multi_turn=args.multi_turn, system_prompt_len=args.system_prompt_len, think_time_s=args.think_time,
        max_model_len=args.max_model_len, ignore_eos=args.ignore_eos, temperature=args.temperature,
        timeout_s=args.timeout, slo=dict(args.slo) | dict(args.goodput), slo_attainment=args.slo_attainment,
        sweep=args.sweep, out=_out(args), progress=not args.no_progress, percentile_metrics=args.percentile_metrics,
        pricing=_pricing(args),
    )


def _pricing(args: argparse.Namespace) -> Pricing | None:
    if args.gpu_hour_usd is None:
        if args.config is not None:
            raise ValueError("--config prices tiers: give --gpu-hour-usd too")
        return None
    return Pricing(gpu_hour_usd=args.gpu_hour_usd, gpus_per_replica=gpus_per_tier(args.config) if args.config else {},
                   default_gpus=args.gpus_per_replica, replicas=args.replicas, blend=args.price_blend)


def _out(args: argparse.Namespace) -> Path | None:
    if args.out is not None or not args.save_result:
        return args.out
    return args.result_dir / (args.result_filename or f"bench-serve-{time.strftime('%Y%m%d-%H%M%S')}.json")


def main(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    result = asyncio.run(run_benchmark(config))
    print_report(result)
    if config.out is not None:
        print(f"results in {config.out}")
