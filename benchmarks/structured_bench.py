"""`mixtral-serve bench structured`: what grammar-constrained decoding costs, in one run.

The same engine decodes `--streams` concurrent requests, every one constrained by a JSON schema,
then none constrained, in interleaved rounds. A constrained request may finish early (its JSON
closes), so each round queues `--requests-per-stream` requests per stream and the engine keeps
`--streams` of them running: tokens/s compares full batches, not batches that thin out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from mixtral_serve.engine_flags import COMMAND_KV_CACHE, add_engine_flags, engine_config

# A record an application might ask for: free strings and a list, nothing that ends it early by design.
SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "required": ["title", "tags", "body"],
    "properties": {"title": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}},
                   "body": {"type": "string"}},
}


class ModeResult(BaseModel):
    mode: str
    streams: int
    tok_s: float  # median over rounds
    rounds: list[float]
    mean_output_tokens: float


def run(args: argparse.Namespace) -> list[ModeResult]:
    from engine import LLM, SamplingParams, StructuredOutput

    config = engine_config(args)
    scheduler = config.scheduler.model_copy(update={"max_num_seqs": args.streams})
    llm = LLM(config=config.model_copy(update={"scheduler": scheduler}))
    modes = {"none": None, "json_schema": StructuredOutput(json_schema=SCHEMA)}
    prompts = [f"Record {i} as JSON:" for i in range(args.streams * args.requests_per_stream)]
    rates: dict[str, list[float]] = {m: [] for m in modes}
    lengths: dict[str, list[int]] = {m: [] for m in modes}
    for round_index in range(args.rounds + 1):  # round 0 warms up (and compiles the grammar)
        for mode, spec in modes.items():
            params = SamplingParams(temperature=1.0, max_tokens=args.output_len, ignore_eos=True,
                                    structured_output=spec)
            start = time.perf_counter()
            results = llm.generate(prompts, params)
            elapsed = time.perf_counter() - start
            tokens = [len(r.outputs[0].token_ids) for r in results]
            if round_index:
                rates[mode].append(sum(tokens) / elapsed)
                lengths[mode] += tokens
    llm.engine.shutdown()
    return [ModeResult(mode=m, streams=args.streams, tok_s=statistics.median(rates[m]), rounds=rates[m],
                       mean_output_tokens=statistics.mean(lengths[m])) for m in modes]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_flags(p, exclude=("scheduler.max_num_seqs",))  # --model (default: the embedded tiny model), --dtype, ...
    p.set_defaults(**COMMAND_KV_CACHE)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--output-len", type=int, default=128, help="max tokens per request")
    p.add_argument("--requests-per-stream", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json-out", type=Path)


def main(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = run(args)
    free = next(r.tok_s for r in rows if r.mode == "none")
    table = Table(title=f"structured outputs: decode tokens/s at {args.streams} streams (median of {args.rounds})")
    for col in ("constraint", "tok/s", "x none", "mean output tokens"):
        table.add_column(col, justify="left" if col == "constraint" else "right")
    for r in rows:
        table.add_row(r.mode, f"{r.tok_s:,.0f}", f"{r.tok_s / free:.2f}", f"{r.mean_output_tokens:.0f}")
    Console(width=max(Console().width, 100)).print(table)
    if args.json_out:
        args.json_out.write_text(json.dumps([r.model_dump() for r in rows], indent=2))
