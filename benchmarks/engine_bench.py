"""`mixtral-serve bench engine`: our engine next to its peers on one checkpoint, in one run.

Workload (the same for every engine, as in benchmarks/peers/*.py): `batch` random token-id
prompts of `prompt_len` tokens (fixed seed), greedy, `ignore_eos`, exactly `max_tokens` new
tokens each, a warm-up of the same shape first, medians over `reps` fresh prompt sets.

  decode_tok_s  batch * (T - 1) / (total_s - prefill_s): the decode phase alone
  ttft_s        one `ttft_len`-token prompt, one new token
  roofline      the decode rate if every step only streamed its weights at the measured bandwidth

NOTE: `--rounds N` runs the whole set (ours, then each peer) N times and reports medians, with
ours / vLLM per round: on the shared virtual machines this runs on, memory bandwidth drifts by
up to ~1.5x over minutes, so one engine's figure against another's run minutes later says little.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from engine.config import SchedulerConfig
from engine.llm import LLM
from engine.model_config import ModelConfig, load_model_config
from engine.sampling_params import SamplingParams
from mixtral_serve.engine_flags import add_engine_flags, engine_config

PEERS = Path(__file__).parent / "peers"


def read_bandwidth_gbs(device: str = "cpu", gib: float = 1.0) -> float:
    """Median of read-only passes over a buffer much larger than the caches, on the engine's device.

    NOTE: the median, not the best: on the virtual machines this runs on, one pass in several
    reads ~1.5x faster than the others (and than any engine step ever streams).
    """
    buf = torch.ones(int(gib * 2**30) // 4, device=device)
    sync = torch.cuda.synchronize if buf.is_cuda else lambda: None
    times = []
    for _ in range(8):  # the first pass warms up (a GPU's clocks, a CPU's pages), not counted
        sync()
        t = time.perf_counter()
        buf.sum()
        sync()
        times.append(time.perf_counter() - t)
    return buf.numel() * 4 / statistics.median(times[1:]) / 1e9


def weight_bytes_per_step(cfg: ModelConfig, batch: int, elem_bytes: int, quantized_bytes: int | None = None) -> float:
    """Weights one decode step must read: attention, router, the experts the batch touches, LM head.

    With uniform routing a layer touches E * (1 - (1 - k/E)^B) distinct experts for B tokens.
    `quantized_bytes`: bytes of an attention or expert weight when they are quantised (fp8: 1);
    router and LM head stay at `elem_bytes`.
    """
    d, e, k = cfg.hidden_size, cfg.num_local_experts, cfg.num_experts_per_tok
    attn = (cfg.q_size + 2 * cfg.kv_size) * d + d * cfg.q_size
    experts = e * (1 - (1 - k / e) ** batch) * 3 * cfg.intermediate_size * d
    quantized = (attn + experts) * (quantized_bytes or elem_bytes)
    return cfg.num_hidden_layers * (quantized + e * d * elem_bytes) + cfg.vocab_size * d * elem_bytes


def _prompts(rng: torch.Generator, n: int, length: int, vocab: int) -> list[list[int]]:
    return [torch.randint(3, vocab, (length,), generator=rng).tolist() for _ in range(n)]


def bench_ours(args: argparse.Namespace) -> list[dict[str, Any]]:
    config = engine_config(args)
    scheduler = SchedulerConfig(max_num_seqs=max(args.batch), max_num_batched_tokens=max(2048, args.ttft_len))
    llm = LLM(config=config.model_copy(update={"load_progress": False, "scheduler": scheduler}))
    vocab = llm.engine.model_config.vocab_size
    rng = torch.Generator().manual_seed(args.seed)

    def timed(n: int, length: int, max_tokens: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        prompts = _prompts(rng, n, length, vocab)
        t = time.perf_counter()
        outs = llm.generate(prompts, params)
        assert sum(len(o.token_ids) for o in outs) == n * max_tokens
        return time.perf_counter() - t

    tp = config.tensor_parallel_size
    label = "mixtral-serve" + "".join(
        f" {part}" for part in (config.quantization, tp > 1 and f"tp{tp}",
                                config.cpu_kernels != "auto" and f"kernels-{config.cpu_kernels}",
                                config.moe_backend != "auto" and f"moe-{config.moe_backend}") if part
    )
    ttft = None
    if args.ttft_len:
        timed(1, args.ttft_len, 1)
        ttft = statistics.median(timed(1, args.ttft_len, 1) for _ in range(args.reps))
    rows = []
    for b in args.batch:
        timed(b, args.prompt_len, args.max_tokens)
        pre = statistics.median(timed(b, args.prompt_len, 1) for _ in range(args.reps))
        tot = statistics.median(timed(b, args.prompt_len, args.max_tokens) for _ in range(args.reps))
        rows.append({"engine": label, "batch": b, "dtype": str(llm.engine.dtype).removeprefix("torch."),
                     "decode_tok_s": b * (args.max_tokens - 1) / max(tot - pre, 1e-9), "ttft_s": ttft})
    llm.engine.shutdown()
    return rows


def bench_peer(cmd: list[str], env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if not rows:
        print(f"peer failed ({' '.join(cmd[:3])} ...):\n{done.stderr[-2000:]}", file=sys.stderr)
    return rows


def _common(args: argparse.Namespace, dtype: str) -> list[str]:
    return ["--model", str(args.model), "--dtype", dtype, "--batch", *map(str, args.batch),
            "--prompt-len", str(args.prompt_len), "--max-tokens", str(args.max_tokens),
            "--ttft-len", str(args.ttft_len), "--reps", str(args.reps), "--seed", str(args.seed)]


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for round_ in range(args.rounds):
        rows += [r | {"round": round_} for r in run_round(args)]
    return rows


def run_round(args: argparse.Namespace) -> list[dict[str, Any]]:
    cfg, _ = load_model_config(Path(args.model))
    rows = bench_ours(args)
    dtype = rows[0]["dtype"]
    if args.transformers:
        rows += bench_peer([sys.executable, str(PEERS / "hf_generate.py"), *_common(args, dtype)])
    if args.vllm_python:
        env = os.environ | {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
        rows += bench_peer([args.vllm_python, str(PEERS / "vllm_offline.py"), *_common(args, dtype)], env)
    bandwidth = read_bandwidth_gbs(engine_config(args).device)
    elem = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    rooflines = {"roofline": None} | ({"roofline fp8": 1} if engine_config(args).quantization == "fp8" else {})
    for name, quantized in rooflines.items():
        for b in args.batch:
            step_bytes = weight_bytes_per_step(cfg, b, elem, quantized)
            rows.append({"engine": name, "batch": b, "dtype": dtype,
                         "decode_tok_s": b * bandwidth * 1e9 / step_bytes, "ttft_s": None,
                         "note": f"{step_bytes / 1e9:.2f} GB/step at {bandwidth:.1f} GB/s read"})
    return rows


def print_table(rows: list[dict[str, Any]], prompt_len: int) -> None:
    from rich.console import Console
    from rich.table import Table

    engines = list(dict.fromkeys(r["engine"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    rounds = len({r.get("round", 0) for r in rows})
    table = Table(title=f"decode tokens/s (greedy, {prompt_len}-token prompts) and TTFT" + (f", medians of {rounds} rounds" if rounds > 1 else ""))
    table.add_column("batch")
    for e in engines:
        table.add_column(e, justify="right")
    for b in batches:
        cells = []
        for e in engines:
            hit = [r["decode_tok_s"] for r in rows if r["engine"] == e and r["batch"] == b]
            cells.append(f"{statistics.median(hit):.1f}" if hit else "-")
        table.add_row(str(b), *cells)
    ttft = []
    for e in engines:
        hit = [r["ttft_s"] for r in rows if r["engine"] == e and r.get("ttft_s")]
        ttft.append(f"{statistics.median(hit) * 1000:.0f} ms" if hit else "-")
    table.add_row("TTFT", *ttft)
    Console().print(table)
    ours = engines[0]
    for peer in ("vllm-cpu", "transformers"):
        lines = [f"{b}: " + ", ".join(f"{x:.0%}" for x in ratios(rows, ours, peer, b)) for b in batches]
        if any(ratios(rows, ours, peer, b) for b in batches):
            print(f"{ours} / {peer}, per round (decode):  " + "   ".join(lines))


def ratios(rows: list[dict[str, Any]], ours: str, peer: str, batch: int) -> list[float]:
    """ours / peer decode tokens/s in each round both ran."""
    by = {(r["engine"], r.get("round", 0)): r["decode_tok_s"] for r in rows if r["batch"] == batch}
    return [by[(ours, k)] / by[(peer, k)] for e, k in by if e == ours and (peer, k) in by]


def add_arguments(p: argparse.ArgumentParser) -> None:
    # Our engine's settings (--model: Hugging Face layout for the peers, which get --dtype too).
    add_engine_flags(p, exclude=("seed",))
    p.set_defaults(**{"cache.kv_cache_bytes": "2GiB"})
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--ttft-len", type=int, default=1024, help="prompt length of the TTFT test (0: skip)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1, help="repeat ours and the peers this many times; medians")
    p.add_argument("--seed", type=int, default=0, help="of the random prompts")
    p.add_argument("--transformers", action="store_true", help="also run transformers' generate()")
    p.add_argument("--vllm-python", help="python of a venv with vllm-cpu installed, to run vLLM as a peer")
    p.add_argument("--json-out", type=Path, help="write all rows here")


def main(args: argparse.Namespace) -> None:
    if args.model is None:
        raise ValueError("bench engine needs --model (a Hugging Face layout folder, which the peers load too)")
    rows = run(args)
    print_table(rows, args.prompt_len)
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=2))
