"""One-shot check of every GPU path: `python benchmarks/gpu_check.py [--checks NAME ...] [--json-out F]`.

On a CUDA machine (one H200: about two minutes; nothing is fetched):
  e2e        the tiny checkpoint end to end on CUDA (Triton MoE, Triton decode attention, CUDA graphs
             captured at start-up): greedy tokens against graphs off and against the CPU engine
  moe        the fused-MoE kernel at the 8x7B and 8x22B expert shapes, bf16 / w8a16 / w8a8, against
             an fp32 loop over experts: relative error, time, weight bandwidth
  fp8 linear `Linear` over an fp8 weight (torch._scaled_mm) at M in {1, 5, 64, 2048} against bf16
  lora       the LoRA shrink/expand kernels on 8x7B's q/k/v shapes, 4 adapters, against PyTorch
  attention  decode (1 x 32K and 64 x 8K context), a prefix-hit prefill (2K chunk over 32K context):
             time and peak memory, against the SDPA-over-a-mask path they replace
  decode     `bench engine` on the bench checkpoint and on 8x7B's shapes over two layers: decode
             tokens/s at batch 1 / 16 / 64 and TTFT, CUDA graphs on and off, bf16 and fp8 weights,
             against the roofline of streaming the weights at the GPU's measured read bandwidth
  serving    the engine as a server runs it (`AsyncEngine`, its core in a process of its own) against
             `LLM.generate`, alternate rounds on the bench checkpoint: tokens/s at 1 / 16 / 64 streams
  nccl       a 2-rank NCCL group (TPGroup.all_reduce and .min) when two GPUs are visible
On a CPU-only machine it says so, runs the same kernels small under Triton's interpreter and the
tiny checkpoint on the CPU engine, and exits 0. It prints one table and writes JSON.

The device image has torch, triton, transformers, safetensors, sentencepiece, tiktoken and tqdm;
these travel as wheels (what the engine imports, with their own needs): pydantic, pydantic-core,
annotated-types, typing-inspection, typing-extensions, mistral-common (whose tokenizer file the
random checkpoints use), pydantic-extra-types, pycountry, jsonschema, jsonschema-specifications,
referencing, rpds-py and llguidance, installed with `pip install --no-index --no-deps --target
/tmp/site .whl/*.whl` and `PYTHONPATH=/tmp/site`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:  # NOTE: must precede the first import of a triton.jit kernel
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.nn.functional as F  # noqa: E402

from benchmarks.gpu_timing import timed  # noqa: E402
from engine.checkpoint import PRESETS, write_checkpoint  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.fused_moe_triton import fused_moe_triton  # noqa: E402
from engine.linear import Linear  # noqa: E402
from engine.llm import LLM  # noqa: E402
from engine.lora_ops import Groups, add_lora_reference  # noqa: E402
from engine.lora_triton import add_lora_triton  # noqa: E402
from engine.moe import select_experts  # noqa: E402
from engine.paged_attention_triton import paged_decode_attention  # noqa: E402
from engine.quant import dequantize_fp8, quantize_act_fp8, quantize_fp8  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from tests.moe_reference import reference_moe  # noqa: E402 - the fp32 loop the CPU tests check against

Row = dict[str, Any]
DEV = torch.device("cuda" if ON_GPU else "cpu")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


# ---- end to end ---------------------------------------------------------------------------------
def check_e2e() -> list[Row]:
    ckpt = write_checkpoint(Path(tempfile.mkdtemp()) / "tiny", PRESETS["tiny"], dtype="float32")
    prompts = [[1, 100 + i, 200 + i, 300 + i] for i in range(8 if ON_GPU else 3)]
    params = SamplingParams(temperature=0.0, max_tokens=32 if ON_GPU else 6, ignore_eos=True)
    common = dict(dtype="float32", cache={"kv_cache_bytes": 64 << 20}, load_progress=False, cpu_kernels="off")
    cpu = [r.token_ids for r in LLM(ckpt, moe_backend="torch", attention_backend="torch", **common).generate(prompts, params)]
    if not ON_GPU:  # the GPU kernels through the interpreter, against PyTorch's ops
        t = time.perf_counter()
        triton_llm = LLM(ckpt, moe_backend="triton", attention_backend="triton", **common)
        same = sum(r.token_ids == c for r, c in zip(triton_llm.generate(prompts, params), cpu))
        return [{"check": "e2e triton kernels on cpu", "shape": f"tiny fp32 x{len(prompts)}", "ok": same == len(prompts),
                 "ms": (time.perf_counter() - t) * 1000, "note": f"equal to torch ops: {same}/{len(prompts)}"}]
    rows = []
    runs = {}
    for label, graphs in (("graphs", {"max_batch": 16}), ("eager", {"max_batch": 0})):
        t = time.perf_counter()
        llm = LLM(ckpt, device="cuda", decode_graphs=graphs, **common)
        start = time.perf_counter() - t
        t = time.perf_counter()
        runs[label] = [r.token_ids for r in llm.generate(prompts, params)]
        gen = time.perf_counter() - t
        graphs_n = llm.engine.runner.graphs.captured if llm.engine.runner.graphs else 0
        rows.append({"check": f"e2e cuda {label}", "shape": "tiny fp32 x8, 32 tokens", "ms": gen * 1000,
                     "note": f"start-up {start:.1f}s, {graphs_n} graphs captured"})
    same_graphs = sum(a == b for a, b in zip(runs["graphs"], runs["eager"]))
    same_cpu = sum(a == b for a, b in zip(runs["eager"], cpu))
    rows[0]["ok"] = same_graphs == len(prompts)
    rows[0]["note"] += f"; equal to eager: {same_graphs}/{len(prompts)}"
    rows[1]["ok"] = same_cpu == len(prompts)
    rows[1]["note"] += f"; equal to CPU engine: {same_cpu}/{len(prompts)}"
    return rows


# ---- fused MoE ----------------------------------------------------------------------------------
def check_moe() -> list[Row]:
    shapes = {"8x7B": (4096, 14336), "8x22B": (6144, 16384)} if ON_GPU else {"small": (128, 256)}
    tokens = [1, 64, 2048] if ON_GPU else [4]
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    rows = []
    gen = torch.Generator(device=DEV).manual_seed(0)
    for name, (d, inter) in shapes.items():
        w13 = (torch.randn(8, 2 * inter, d, device=DEV, generator=gen) * d**-0.5).to(dtype)  # [E, 2I, D]
        w2 = (torch.randn(8, d, inter, device=DEV, generator=gen) * inter**-0.5).to(dtype)  # [E, D, I]
        w13_8, s13 = quantize_fp8(w13, per_channel=True)
        w2_8, s2 = quantize_fp8(w2, per_channel=True)
        w13_deq, w2_deq = dequantize_fp8(w13_8, s13), dequantize_fp8(w2_8, s2)  # fp32: the fp8 runs' reference
        for t in tokens:
            x = torch.randn(t, d, device=DEV, generator=gen).to(dtype)  # [T, D]
            weights, ids = select_experts(torch.randn(t, 8, device=DEV, generator=gen), 2)  # [T, k]
            experts = int(torch.unique(ids).numel())
            variants = {
                "bf16" if ON_GPU else "fp32": (2 if ON_GPU else 4, w13, w2, lambda: fused_moe_triton(x, w13, w2, weights, ids)),
                "w8a16": (1, w13_deq, w2_deq,
                          lambda: fused_moe_triton(x, w13_8, w2_8, weights, ids, s13, s2, quantize_activations=False)),
                "w8a8": (1, w13_deq, w2_deq,
                         lambda: fused_moe_triton(x, w13_8, w2_8, weights, ids, s13, s2, quantize_activations=True)),
            }
            for label, (elem, ref_w13, ref_w2, fn) in variants.items():
                ref = reference_moe(x, ref_w13, ref_w2, weights, ids, quantize_acts=label == "w8a8")
                err = rel_err(fn(), ref)
                ms, peak = timed(fn, 20 if ON_GPU else 1)
                gbs = experts * 3 * d * inter * elem / (ms * 1e-3) / 1e9
                bound = 0.02 if label == "w8a8" else 0.01
                rows.append({"check": f"moe {label}", "shape": f"{name} T={t}", "ok": err < bound, "err": err,
                             "ms": ms, "GB/s": gbs, "peak_GiB": peak})
    return rows


# ---- fp8 Linear ---------------------------------------------------------------------------------
def check_fp8_linear() -> list[Row]:
    n, k = (14336, 4096) if ON_GPU else (64, 64)
    w = torch.randn(n, k, device=DEV) * k**-0.5  # [N, K]
    w8, scale = quantize_fp8(w, per_channel=True)
    rows = []
    for m in ([1, 5, 64, 2048] if ON_GPU else [1, 5]):
        x = torch.randn(m, k, device=DEV).to(torch.bfloat16)  # [M, K]
        try:
            linear = Linear(w8, scale)
            out = linear(x)
        except (RuntimeError, ValueError) as err:
            rows.append({"check": "fp8 linear", "shape": f"M={m}", "ok": False, "note": str(err)[:120]})
            continue
        x8, xs = quantize_act_fp8(x)
        ref = (x8.float() * xs) @ dequantize_fp8(w8, scale).t()  # [M, N]
        ms, peak = timed(lambda: linear(x), 50)
        rows.append({"check": "fp8 linear", "shape": f"M={m} {n}x{k}", "ok": rel_err(out, ref) < 0.01,
                     "err": rel_err(out, ref), "ms": ms, "GB/s": n * k / (ms * 1e-3) / 1e9, "peak_GiB": peak})
    return rows


# ---- LoRA ---------------------------------------------------------------------------------------
def check_lora() -> list[Row]:
    """The shrink/expand kernel pair on 8x7B's fused q/k/v projection, 4 adapters (and rows with
    none), against the segmented PyTorch product in fp32."""
    k, splits, rank = (4096, (4096, 1024, 1024), 16) if ON_GPU else (64, (64, 16, 16), 4)
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    gen = torch.Generator(device=DEV).manual_seed(0)
    a = (torch.randn(4, len(splits) * rank, k, device=DEV, generator=gen) * k**-0.5).to(dtype)  # [G, 3R, K]
    b = (torch.randn(4, rank, sum(splits), device=DEV, generator=gen) * rank**-0.5).to(dtype)  # [G, R, N]
    rows = []
    for t in [1, 64, 2048] if ON_GPU else [1, 5]:
        x = torch.randn(t, k, device=DEV, generator=gen).to(dtype)  # [T, K]
        index = torch.arange(t, device=DEV) % 5  # [T]: adapters 0..3 in turn, then a row of the base model only
        index[index == 4] = -1
        out = torch.randn(t, sum(splits), device=DEV, generator=gen).to(dtype)  # [T, N]
        ref = out.float().clone()  # [T, N] fp32 (a copy even when out is fp32)
        add_lora_reference(ref, x.float(), Groups(index), a.float(), b.float(), splits)
        got = out.clone()
        add_lora_triton(got, x, index, a, b, splits)
        err = rel_err(got - out, ref - out)  # the LoRA delta alone
        ms, peak = timed(lambda: add_lora_triton(out.clone(), x, index, a, b, splits), 20 if ON_GPU else 1)
        rows.append({"check": "lora shrink/expand", "shape": f"T={t} K={k} R={rank} x4", "ok": err < 0.02,
                     "err": err, "ms": ms, "peak_GiB": peak})
    return rows


# ---- attention ----------------------------------------------------------------------------------
def check_attention() -> list[Row]:
    from torch.nn.attention.bias import causal_lower_right

    heads, kv_heads, hd = (32, 8, 128) if ON_GPU else (8, 2, 32)
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    rows = []
    for batch, context in ((1, 32768), (64, 8192)) if ON_GPU else ((4, 64),):
        slots_total = batch * context
        k_cache = torch.randn(slots_total, kv_heads, hd, device=DEV, dtype=dtype)  # [S, KVH, hd]
        v_cache = torch.randn_like(k_cache)
        slots = torch.randperm(slots_total, device=DEV).view(batch, context)  # [B, L] scattered
        q = torch.randn(batch, heads, hd, device=DEV, dtype=dtype)  # [B, H, hd]
        first = torch.zeros(batch, dtype=torch.long, device=DEV)
        last = torch.full((batch,), context - 1, dtype=torch.long, device=DEV)

        def masked() -> torch.Tensor:  # what the decode kernel replaces
            kc, vc = k_cache[slots].transpose(1, 2), v_cache[slots].transpose(1, 2)  # [B, KVH, L, hd]
            mask = torch.ones(batch, 1, 1, context, dtype=torch.bool, device=DEV)
            return F.scaled_dot_product_attention(q.unsqueeze(2), kc, vc, attn_mask=mask, enable_gqa=True).squeeze(2)

        kernel = lambda: paged_decode_attention(q, k_cache, v_cache, slots, first, last)  # noqa: E731
        ref = masked()
        for label, fn in (("decode triton", kernel), ("decode sdpa+mask", masked)):
            ms, peak = timed(fn, 10 if ON_GPU else 1)
            err = rel_err(fn(), ref)
            rows.append({"check": f"attention {label}", "shape": f"{batch} seqs x {context}", "ok": err < 0.02,
                         "err": err, "ms": ms, "peak_GiB": peak,
                         "GB/s": 2 * slots_total * kv_heads * hd * k_cache.element_size() / (ms * 1e-3) / 1e9})
    chunk, ctx = (2048, 32768) if ON_GPU else (16, 64)
    qs = torch.randn(1, heads, chunk, hd, device=DEV, dtype=dtype)  # [1, H, q, hd]
    kc = torch.randn(1, kv_heads, ctx, hd, device=DEV, dtype=dtype)  # [1, KVH, C, hd]
    vc = torch.randn_like(kc)
    lower_right = lambda: F.scaled_dot_product_attention(  # noqa: E731
        qs, kc, vc, attn_mask=causal_lower_right(chunk, ctx), enable_gqa=True)
    ms, peak = timed(lower_right, 5 if ON_GPU else 1)
    q_pos = torch.arange(ctx - chunk, ctx, device=DEV)[:, None]
    dense_mask = torch.arange(ctx, device=DEV)[None, :] <= q_pos  # [q, C]
    ref_rows = slice(chunk - 8, chunk)  # the dense reference only for the last rows (its scores are huge)
    ref = F.scaled_dot_product_attention(qs[:, :, ref_rows], kc, vc, attn_mask=dense_mask[ref_rows], enable_gqa=True)
    err = rel_err(lower_right()[:, :, ref_rows], ref)
    rows.append({"check": "attention prefill lower-right", "shape": f"{chunk} chunk x {ctx}", "ok": err < 0.02,
                 "err": err, "ms": ms, "peak_GiB": peak})
    return rows


# ---- decode speed -------------------------------------------------------------------------------
def check_decode() -> list[Row]:
    """`bench engine`'s measurement (decode tokens/s, TTFT, the weight-streaming roofline at the
    device's read bandwidth) on the bench checkpoint and on 8x7B's shapes cut to two layers (a
    whole 8x7B would not fit the disk): CUDA graphs on and off, bf16 and fp8 weights."""
    from benchmarks import engine_bench

    if ON_GPU:
        models = {"bench": PRESETS["bench"], "8x7B 2 layers": PRESETS["bench"].model_copy(update=dict(
            hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
            num_key_value_heads=8, head_dim=128))}
        variants = {"graphs": [], "eager": ["--decode-graphs-max-batch", "0"], "fp8 graphs": ["--quantization", "fp8"]}
        shape = ["--batch", "1", "16", "64", "--max-tokens", "64", "--ttft-len", "1024", "--reps", "3"]
    else:  # the same code path, small: the tiny checkpoint on the CPU engine
        models, variants = {"tiny": PRESETS["tiny"]}, {"eager": []}
        shape = ["--batch", "1", "4", "--max-tokens", "8", "--ttft-len", "64", "--reps", "1"]
    parser = argparse.ArgumentParser()
    engine_bench.add_arguments(parser)
    rows = []
    for name, cfg in models.items():
        ckpt = write_checkpoint(Path(tempfile.mkdtemp()) / "decode", cfg, dtype="bfloat16")
        for variant, flags in variants.items():
            args = parser.parse_args(["--model", str(ckpt), "--device", DEV.type, "--dtype", "bfloat16",
                                      "--no-load-progress", *shape, *flags])
            t = time.perf_counter()
            measured = engine_bench.run_round(args)
            ours = [r for r in measured if not r["engine"].startswith("roofline")]
            top_name = "roofline fp8" if "fp8" in variant else "roofline"
            roofline = {r["batch"]: r for r in measured if r["engine"] == top_name}
            for r in ours:
                top = roofline[r["batch"]]
                rows.append({"check": f"decode {variant}", "shape": f"{name} B={r['batch']}",
                             "ok": r["decode_tok_s"] > 0, "tok/s": r["decode_tok_s"], "ms": r["ttft_s"] * 1000,
                             "note": f"TTFT ({args.ttft_len} tokens) in ms; roofline {top['decode_tok_s']:.0f} tok/s "
                                     f"({r['decode_tok_s'] / top['decode_tok_s']:.0%}): {top['note']}"})
            print(f"    {name} {variant}: {time.perf_counter() - t:.1f}s", flush=True)
        shutil.rmtree(ckpt.parent, ignore_errors=True)
    return rows


# ---- the served engine -------------------------------------------------------------------------
def check_serving() -> list[Row]:
    """The engine as a server runs it, `AsyncEngine` with its core in a process of its own, against
    `LLM.generate` in this process, in alternate rounds (benchmarks/engine_paths.py): what the core's
    per-step hand-off costs once a step takes a GPU's milliseconds rather than a CPU's tens."""
    from benchmarks.engine_paths import bench_engines

    preset, levels, output_len, rounds = ("bench", [1, 16, 64], 128, 3) if ON_GPU else ("tiny", [1, 4], 8, 1)
    ckpt = write_checkpoint(Path(tempfile.mkdtemp()) / "serving", PRESETS[preset], dtype="bfloat16")
    config = EngineConfig(model=str(ckpt), device=DEV.type, dtype="bfloat16", load_progress=False,
                          cache={"kv_cache_bytes": "2GiB" if ON_GPU else "16MiB"})
    try:
        measured = asyncio.run(bench_engines(config, levels, ["engine-sync", "engine-async"], input_len=32,
                                             output_len=output_len, rounds=rounds))
    finally:
        shutil.rmtree(ckpt.parent, ignore_errors=True)
    sync = {r.streams: r.total_tok_s for r in measured if r.path == "engine-sync"}
    rows = []
    for r in measured:
        row = {"check": f"serving {r.path}", "shape": f"{preset} bf16 x{r.streams}, {output_len} tokens",
               "ok": r.total_tok_s > 0, "tok/s": r.total_tok_s,
               "note": f"{r.total_tok_s / sync[r.streams]:.2f}x engine-sync"}
        if r.ttft_p50_ms is not None:
            row |= {"ms": r.ttft_p50_ms, "note": row["note"] + f"; ms: TTFT p50 (p99 {r.ttft_p99_ms:.1f})"}
        rows.append(row)
    return rows


# ---- NCCL ---------------------------------------------------------------------------------------
def _nccl_rank(rank: int, init_method: str, results: Any) -> None:
    from engine.parallel import init_group

    tp = init_group(rank, 2, init_method, torch.device("cuda", rank))
    x = torch.full((4,), float(rank + 1), device=tp.device)
    tp.all_reduce(x)
    results[rank] = (float(x[0]), tp.min(10 + rank))
    tp.close()


def check_nccl() -> list[Row]:
    if not ON_GPU or torch.cuda.device_count() < 2:
        return [{"check": "nccl 2 ranks", "ok": True, "note": "skipped: fewer than two GPUs"}]
    from engine.ranks import free_port

    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Manager().dict()
    init = f"tcp://127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_nccl_rank, args=(r, init, results)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    ok = dict(results) == {0: (3.0, 10), 1: (3.0, 10)}
    return [{"check": "nccl 2 ranks", "ok": ok, "note": str(dict(results))}]


CHECKS: dict[str, Callable[[], list[Row]]] = {
    "e2e": check_e2e, "moe": check_moe, "fp8-linear": check_fp8_linear, "lora": check_lora,
    "attention": check_attention, "decode": check_decode, "serving": check_serving, "nccl": check_nccl,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json-out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--checks", nargs="+", choices=list(CHECKS), default=list(CHECKS), help="default: all")
    args = parser.parse_args()
    where = torch.cuda.get_device_name() if ON_GPU else "no GPU: CPU-side checks only (Triton interpreter, small shapes)"
    print(f"gpu_check on {where}; torch {torch.__version__}")
    rows: list[Row] = []
    for check in (CHECKS[name] for name in args.checks):
        t = time.perf_counter()
        try:
            rows += check()
        except Exception as err:  # noqa: BLE001 - one broken check must not hide the others
            rows.append({"check": check.__name__, "ok": False, "note": f"{type(err).__name__}: {err}"[:300]})
        print(f"  {check.__name__} done in {time.perf_counter() - t:.1f}s", flush=True)
        args.json_out.write_text(json.dumps({"device": where, "rows": rows}, indent=2))  # kept if a later check hangs
    cols = ("check", "shape", "ok", "err", "ms", "GB/s", "tok/s", "peak_GiB", "note")
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in cols))
    failed = [r for r in rows if r.get("ok") is False]
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    sys.exit(1 if failed and ON_GPU else 0)


if __name__ == "__main__":
    main()
