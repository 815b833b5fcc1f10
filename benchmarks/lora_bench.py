"""`mixtral-serve bench lora`: what serving LoRA adapters costs, in one run.

One engine (`max_loras` = the most adapters asked for, rank `--rank`) decodes `--streams`
concurrent requests with 0 (the base model), then 1, 4 and 16 distinct adapters spread over the
streams, in interleaved rounds; round 0 warms up (and loads every adapter into its slot). The
adapters are random, on every target (attention q/k/v/o, the experts' w1/w2/w3), written next to
nothing the user keeps (a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel

from mixtral_serve.engine_flags import COMMAND_KV_CACHE, add_engine_flags, engine_config


class ModeResult(BaseModel):
    adapters: int
    streams: int
    tok_s: float  # median over rounds
    rounds: list[float]


def run(args: argparse.Namespace) -> list[ModeResult]:
    from engine import LLM, LoRARequest, SamplingParams
    from engine.checkpoint import default_model_dir
    from engine.lora_adapter import write_random_adapter

    config = engine_config(args)
    model = config.model or str(default_model_dir())
    most = max(args.adapters)
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as tmp:
        requests = [LoRARequest(f"a{i}", str(write_random_adapter(model, Path(tmp) / f"a{i}", args.rank, seed=i)))
                    for i in range(most)]
        llm = LLM(config=config.model_copy(update={
            "model": model, "scheduler": config.scheduler.model_copy(update={"max_num_seqs": args.streams}),
            "lora": config.lora.model_copy(update={"max_loras": max(most, 1), "max_lora_rank": args.rank})}))
        prompts = [f"Request {i} tells a story:" for i in range(args.streams)]
        params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
        rates: dict[int, list[float]] = {n: [] for n in args.adapters}
        for round_index in range(args.rounds + 1):
            for n in args.adapters:
                loras = [requests[i % n] if n else None for i in range(args.streams)]
                start = time.perf_counter()
                results = llm.generate(prompts, params, lora_request=loras)
                elapsed = time.perf_counter() - start
                if round_index:
                    rates[n].append(sum(len(r.token_ids) for r in results) / elapsed)
        llm.engine.shutdown()
    return [ModeResult(adapters=n, streams=args.streams, tok_s=statistics.median(rates[n]), rounds=rates[n])
            for n in args.adapters]


def add_arguments(p: argparse.ArgumentParser) -> None:
    # --model (default: the embedded tiny model), --dtype, ...; the bench sets these three itself
    add_engine_flags(p, exclude=("scheduler.max_num_seqs", "lora.max_loras", "lora.max_lora_rank"))
    p.set_defaults(**COMMAND_KV_CACHE)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--adapters", type=int, nargs="+", default=[0, 1, 4, 16], help="distinct adapters per mode")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--output-len", type=int, default=64, help="tokens per request")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json-out", type=Path)


def main(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = run(args)
    base = next((r.tok_s for r in rows if r.adapters == 0), rows[0].tok_s)
    table = Table(title=f"LoRA: decode tokens/s at {args.streams} streams, rank {args.rank}, all targets "
                        f"(median of {args.rounds})")
    for col in ("distinct adapters", "tok/s", "step time x base"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r.adapters), f"{r.tok_s:,.0f}", f"{base / r.tok_s:.2f}")
    Console(width=max(Console().width, 100)).print(table)
    if args.json_out:
        args.json_out.write_text(json.dumps([r.model_dump() for r in rows], indent=2))
