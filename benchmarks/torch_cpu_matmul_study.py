#!/usr/bin/env python3
"""A study of PyTorch's own CPU matmul paths for Mixtral decode: y = x @ W.T on the "bench" shapes.

Measures many ways of multiplying activations by weights with torch on CPU
(plain aten, oneDNN/MKL prepacked, torch.compile/inductor, int8/int4/fp8
weight-only), the MoE expert selection at M=1, whole expert MLPs and the fixed
per-call overheads of small torch ops.

Weights are replicated into pools of copies (--pool-mb in total, default 1 GiB,
more than the L3 the VM reports) used round-robin, so every call streams its
weight from DRAM as in a real decode step (0.46 GB of active weights per token
at batch 1).

The machine may be shared with other jobs. So, for each (shape, M) all candidate
methods are timed INTERLEAVED (round after round, one call of each method per
round, each call timed alone) so that they see the same noise, and both the
minimum and the median per-call time are reported. Trust the minimum (best
achievable), read the median as "under the load that was there".

Reported per call: ms (min / median), effective GB/s = weight bytes read / min
time (bytes of the stored weight format incl. scales), and the relative error of
the output against an fp64 reference computed with the unquantised fp32 weight
(so quantised formats show their quantisation error).

Examples:
  python benchmarks/torch_cpu_matmul_study.py                       # everything
  python benchmarks/torch_cpu_matmul_study.py --groups linear --shapes w13 --M 1 16
  python benchmarks/torch_cpu_matmul_study.py --groups overhead moe mlp
  python benchmarks/torch_cpu_matmul_study.py --methods 'mkldnn*' 'linear_*' --markdown out.md
"""
from __future__ import annotations

import argparse
import fnmatch
import gc
import json
import os
from functools import partial
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

D, I = 1024, 3584
SHAPES: dict[str, tuple[int, int]] = {  # name -> (N out, K in); W is [N, K]
    "w13": (2 * I, D),
    "w2": (D, I),
    "qkv": (D + 2 * 256, D),
    "o": (D, D),
    "lm_head": (32000, D),
}
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
FP8 = torch.float8_e4m3fn


# --------------------------------------------------------------------------- #
# timing helpers
# --------------------------------------------------------------------------- #
def procs_running() -> int:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("procs_running"):
                return int(line.split()[1])
    return 0


QUIET = {"max_wait": 0.0, "last_busy": 0, "gate_busy": 0, "gate_max_s": 2.0, "gate_factor": 20.0}


def wait_quiet(max_wait: float) -> int:
    """The machine may be shared: wait (up to max_wait s) until no other thread is runnable.

    Returns the number of other runnable threads seen at the end (0 = quiet)."""
    t_end = time.perf_counter() + max_wait
    quiet_polls = 0
    while True:
        busy = max(0, procs_running() - 1)
        quiet_polls = quiet_polls + 1 if busy == 0 else 0
        if quiet_polls >= 3 or time.perf_counter() >= t_end:
            QUIET["last_busy"] = busy
            return busy
        time.sleep(0.1)


def gate() -> None:
    """Block until at most QUIET['gate_busy'] other threads are runnable (or QUIET['gate_max_s'] passed)."""
    limit = QUIET["gate_busy"]
    if limit < 0:
        return
    t_end = time.perf_counter() + QUIET["gate_max_s"]
    while procs_running() - 1 > limit and time.perf_counter() < t_end:
        time.sleep(0.005)


def bench(calls: list[Callable[[], object]], div: int, min_time: float, min_reps: int = 5,
          max_reps: int = 200000) -> tuple[float, float]:
    """(min, median) seconds per kernel call.

    `calls` are used round-robin (one per weight copy, so each timed call streams a weight that is not in
    cache); each sample times ONE callable and divides by `div` (the number of kernel calls it makes).
    Short samples + the minimum make the figure robust on a shared machine; the median shows the noise."""
    wait_quiet(QUIET["max_wait"])
    for c in calls:  # warm-up, touches every copy once
        c()
    times = []
    n = len(calls)
    t_start = time.perf_counter()
    i = 0
    while True:
        c = calls[i % n]
        gate()
        t0 = time.perf_counter()
        c()
        times.append((time.perf_counter() - t0) / div)
        i += 1
        if len(times) >= max_reps:
            break
        if len(times) >= max(min_reps, min(n, 2 * n)) and time.perf_counter() - t_start >= min_time:
            break
    return min(times), statistics.median(times)


@dataclass
class Entry:
    """One candidate in an interleaved session."""
    row: "Row"
    calls: list  # callables, one per weight copy (or one per compiled multi-copy graph)
    div: int  # kernel calls made by one callable
    nbytes: int  # weight bytes read per kernel call
    samples: list = field(default_factory=list)
    est: float = 0.0


def interleave(entries: list[Entry], time_per_entry: float, min_rounds: int = 5, slow_s: float = 0.25,
               target_s: float = 0.002) -> None:
    """Time all entries round-robin; fills row.ms/ms_med/gbs/busy."""
    if not entries:
        return
    busy = wait_quiet(QUIET["max_wait"])
    for e in entries:  # warm-up: every copy once, and a per-call estimate
        t0 = time.perf_counter()
        for c in e.calls:
            c()
        e.est = (time.perf_counter() - t0) / len(e.calls)
    budget = time_per_entry * len(entries)
    t_start = time.perf_counter()
    wall_cap = t_start + QUIET["gate_factor"] * budget
    measured = 0.0
    rnd = 0
    pos = {id(e): 0 for e in entries}
    while True:
        for e in entries:
            if e.est > slow_s and rnd >= min_rounds:
                continue  # very slow candidates: only min_rounds samples
            reps = max(1, min(16, int(target_s / max(e.est, 1e-7))))
            for _ in range(reps):
                gate()  # shared machine: sample only while (almost) nobody else is runnable
                c = e.calls[pos[id(e)] % len(e.calls)]
                pos[id(e)] += 1
                t0 = time.perf_counter()
                c()
                dt = time.perf_counter() - t0
                measured += dt
                e.samples.append(dt / e.div)
        rnd += 1
        if rnd >= min_rounds and (measured >= budget or time.perf_counter() >= wall_cap):
            break
    for e in entries:
        mn, md = min(e.samples), statistics.median(e.samples)
        e.row.ms, e.row.ms_med, e.row.busy = mn * 1e3, md * 1e3, busy
        e.row.gbs = e.nbytes / mn / 1e9 if e.nbytes else None
        e.row.copies = e.row.copies or len(e.calls) * e.div


def read_probe(mb: int = 1024) -> float:
    """GB/s of a read-only fp32 reduction over mb MiB (machine-noise indicator)."""
    a = torch.ones(mb * 2**20 // 4)
    a.sum()
    t0 = time.perf_counter()
    for _ in range(5):
        a.sum()
    return 5 * a.numel() * 4 / (time.perf_counter() - t0) / 1e9


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y = y.double()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


@dataclass
class Row:
    group: str
    shape: str
    M: int
    wdtype: str
    method: str
    ms: float | None  # minimum over repetitions
    gbs: float | None  # weight bytes / minimum time
    err: float | None
    copies: int = 0
    note: str = ""
    compile_s: float | None = None
    ms_med: float | None = None  # median over repetitions
    busy: int | None = None  # other runnable threads seen just before timing (0 = quiet machine)

    def as_dict(self):
        return self.__dict__.copy()


# --------------------------------------------------------------------------- #
# weight formats
# --------------------------------------------------------------------------- #
def q_int8_rowwise(w: torch.Tensor):
    s = w.abs().amax(1).clamp_min(1e-12) / 127.0
    q = torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8)
    return q, s


def q_fp8_rowwise(w: torch.Tensor):
    s = w.abs().amax(1).clamp_min(1e-12) / 448.0
    q = (w / s[:, None]).to(FP8)
    return q, s


def q_int4_group(w: torch.Tensor, gs: int = 128, inner_k_tiles: int = 8):
    """gpt-fast style asymmetric int4: w = (q - 8) * scale + zero."""
    n, k = w.shape
    wg = w.view(n, k // gs, gs)
    mn, mx = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    sc = ((mx - mn) / 15).clamp_min(1e-12)
    q = torch.round((wg - mn) / sc).clamp(0, 15).to(torch.int32).view(n, k)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, inner_k_tiles)
    sz = torch.stack([sc.view(n, k // gs).t(), (mn + 8 * sc).view(n, k // gs).t()], -1)
    return packed, sz.contiguous().to(BF16)


# --------------------------------------------------------------------------- #
# linear-kernel methods
# --------------------------------------------------------------------------- #
@dataclass
class Method:
    name: str
    wdtype: str
    xdtype: torch.dtype
    prepare: Callable[[torch.Tensor, int], tuple]  # (w_fp32 master, M) -> state tuple (fresh memory)
    run: Callable  # (x, *state) -> y
    nbytes: Callable[[tuple], int]  # bytes of weight read per call
    depends_on_m: bool = False
    max_copies: int = 100000
    compile_mode: str | None = None  # None, "default", "max-autotune", "freeze", "freeze-max-autotune"
    note: str = ""
    m_max: int = 1 << 30


def _nb(*ts):
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def _lin(x, w):
    return F.linear(x, w)


def _gemv_mulsum(x, w):  # the pattern inductor turns into a fused, vectorised reduction
    return (x[:, None, :].float() * w[None, :, :].float()).sum(-1).to(x.dtype)


def _gemv_deq(x, w, s):
    return ((x[:, None, :].float() * w[None, :, :].float()).sum(-1) * s.float()).to(x.dtype)


def _deq_linear(x, w, s):
    return F.linear(x, w.to(x.dtype)) * s.to(x.dtype)


def _deq_linear_rescale_in(x, w, s):
    return F.linear(x, (w.to(FP32) * s[:, None]).to(x.dtype))


def build_methods() -> list[Method]:
    ms: list[Method] = []
    for lab, dt in (("fp32", FP32), ("bf16", BF16), ("fp16", FP16)):
        ms.append(Method(f"linear_{lab}", lab, dt, lambda w, M, dt=dt: (w.to(dt, copy=True),),
                         lambda x, w: F.linear(x, w), lambda st: _nb(*st),
                         note="F.linear(x, W), W [N,K]"))
        ms.append(Method(f"matmul_t_{lab}", lab, dt, lambda w, M, dt=dt: (w.t().to(dt).contiguous(),),
                         lambda x, wt: x @ wt, lambda st: _nb(*st),
                         note="x @ Wt, Wt [K,N] contiguous"))
    for lab, dt in (("fp32", FP32), ("bf16", BF16), ("fp16", FP16)):
        ms.append(Method(f"mkldnn_packed_{lab}", lab, dt,
                         lambda w, M, dt=dt: (torch.ops.mkldnn._reorder_linear_weight(w.to(dt, copy=True), M),),
                         lambda x, wp: torch.ops.mkldnn._linear_pointwise(x, wp, None, "none", [], ""),
                         lambda st: _nb(*st), depends_on_m=True,
                         note="mkldnn._reorder_linear_weight(W, M) + mkldnn._linear_pointwise"))
    for lab, dt in (("fp32", FP32), ("bf16", BF16)):  # one packing for every batch size (what a server needs)
        ms.append(Method(f"mkldnn_packed1_{lab}", lab, dt,
                         lambda w, M, dt=dt: (torch.ops.mkldnn._reorder_linear_weight(w.to(dt, copy=True), 1),),
                         lambda x, wp: torch.ops.mkldnn._linear_pointwise(x, wp, None, "none", [], ""),
                         lambda st: _nb(*st),
                         note="as mkldnn_packed but packed once with batch_size=1, used for every M"))
        ms.append(Method(f"mkldnn_packedNone_{lab}", lab, dt,
                         lambda w, M, dt=dt: (torch.ops.mkldnn._reorder_linear_weight(w.to(dt, copy=True)),),
                         lambda x, wp: torch.ops.mkldnn._linear_pointwise(x, wp, None, "none", [], ""),
                         lambda st: _nb(*st),
                         note="as mkldnn_packed but packed with batch_size=None"))
    ms.append(Method("mkl_packed_fp32", "fp32", FP32,
                     lambda w, M: (torch.ops.mkl._mkl_reorder_linear_weight(w.clone(), M), w.clone()),
                     lambda x, wp, wo: torch.ops.mkl._mkl_linear(x, wp, wo, None, x.shape[0]),
                     lambda st: _nb(st[1]), depends_on_m=True,
                     note="mkl._mkl_reorder_linear_weight + mkl._mkl_linear (inductor fp32 freezing path); "
                          "GB/s uses logical 4*N*K bytes, MKL's packed buffer is larger"))
    for lab, dt in (("fp32", FP32), ("bf16", BF16)):
        ms.append(Method(f"mkldnn_tensor_{lab}", lab, dt,
                         lambda w, M, dt=dt: (w.to(dt, copy=True).to_mkldnn(),),
                         lambda x, wm: torch._C._nn.mkldnn_linear(x.to_mkldnn(), wm, None).to_dense(),
                         lambda st: st[0].numel() * st[0].element_size(),
                         note="torch._C._nn.mkldnn_linear(x.to_mkldnn(), W.to_mkldnn())"))
    # torch.compile variants (weights as graph inputs, or frozen constants)
    for lab, dt in (("bf16", BF16), ("fp32", FP32)):
        for mode in ("default", "max-autotune", "freeze", "freeze-max-autotune"):
            ms.append(Method(f"compile_{mode}_{lab}", lab, dt, lambda w, M, dt=dt: (w.to(dt, copy=True),),
                             _lin, lambda st: _nb(*st), compile_mode=mode, max_copies=16 if "freeze" in mode else 100000,
                             note=f"torch.compile(F.linear) mode={mode}"))
    for lab, dt in (("bf16", BF16), ("fp16", FP16), ("fp32", FP32)):
        ms.append(Method(f"compile_gemv_mulsum_{lab}", lab, dt, lambda w, M, dt=dt: (w.to(dt, copy=True),),
                         _gemv_mulsum, lambda st: _nb(*st), compile_mode="default", m_max=2,
                         note="torch.compile((x[:,None,:].float()*W.float()).sum(-1)) fused reduction"))
    # int8 weight-only
    for lab, dt in (("bf16", BF16), ("fp32", FP32)):
        ms.append(Method(f"int8pack_mm_x{lab}", "int8", dt,
                         lambda w, M, dt=dt: (lambda q, s: (q, s.to(dt)))(*q_int8_rowwise(w)),
                         lambda x, q, s: torch._weight_int8pack_mm(x, q, s), lambda st: _nb(*st),
                         note="aten._weight_int8pack_mm(x, W_int8 [N,K], rowscale)"))
    ms.append(Method("int8_compile_gemv_xbf16", "int8", BF16, lambda w, M: q_int8_rowwise(w),
                     _gemv_deq, lambda st: _nb(*st), compile_mode="default", m_max=2,
                     note="torch.compile fused dequant (mul-sum) GEMV"))
    ms.append(Method("int8_deq_linear_xbf16", "int8", BF16, lambda w, M: q_int8_rowwise(w),
                     _deq_linear, lambda st: _nb(*st), note="F.linear(x, W8.to(bf16)) * s (eager)"))
    ms.append(Method("int8_compile_freeze_max-autotune_xbf16", "int8", BF16, lambda w, M: q_int8_rowwise(w),
                     _deq_linear, lambda st: _nb(*st), compile_mode="freeze-max-autotune", max_copies=16,
                     note="inductor WOQ-int8 pattern (F.linear(x, W8.to(bf16))*s) frozen + max-autotune"))
    ms.append(Method("qdyn_int8_fbgemm_xfp32", "int8", FP32,
                     lambda w, M: (torch.ops.quantized.linear_prepack(
                         torch.quantize_per_channel(w, q_int8_rowwise(w)[1].double(), torch.zeros(w.shape[0], dtype=torch.long),
                                                    0, torch.qint8), None),),
                     lambda x, p: torch.ops.quantized.linear_dynamic(x, p),
                     lambda st: 0, note="quantized::linear_dynamic (dynamic int8 act, x86 engine)"))
    # int4 weight-only
    ms.append(Method("int4pack_mm_g128_xbf16", "int4", BF16, lambda w, M: q_int4_group(w),
                     lambda x, p, sz: torch._weight_int4pack_mm_for_cpu(x, p, 128, sz), lambda st: _nb(*st),
                     note="aten._weight_int4pack_mm_for_cpu, group 128"))
    # fp8 e4m3 weight-only
    ms.append(Method("fp8_deq_linear_xbf16", "fp8", BF16, lambda w, M: q_fp8_rowwise(w),
                     _deq_linear, lambda st: _nb(*st), note="F.linear(x, W8.to(bf16)) * s (eager)"))
    ms.append(Method("fp8_compile_gemv_xbf16", "fp8", BF16, lambda w, M: q_fp8_rowwise(w),
                     _gemv_deq, lambda st: _nb(*st), compile_mode="default", m_max=2,
                     note="torch.compile fused dequant (mul-sum) GEMV"))
    ms.append(Method("fp8_compile_deq_linear_xbf16", "fp8", BF16, lambda w, M: q_fp8_rowwise(w),
                     _deq_linear, lambda st: _nb(*st), compile_mode="default",
                     note="torch.compile(F.linear(x, W8.to(bf16)) * s)"))
    ms.append(Method("fp8_compile_freeze_max-autotune_xbf16", "fp8", BF16, lambda w, M: q_fp8_rowwise(w),
                     _deq_linear, lambda st: _nb(*st), compile_mode="freeze-max-autotune", max_copies=16,
                     note="frozen + max-autotune (constant-folds dequant -> bf16 weight!)"))
    ms.append(Method("fp8_scaled_mm", "fp8", BF16,
                     lambda w, M: (lambda q, s: (q.t(), torch.tensor(1.0), torch.tensor(1.0)))(*q_fp8_rowwise(w)),
                     lambda x, wt, sa, sb: torch._scaled_mm(x.to(FP8), wt, scale_a=sa, scale_b=sb, out_dtype=BF16),
                     lambda st: _nb(st[0]), max_copies=2, m_max=2,
                     note="torch._scaled_mm (scales ignored for timing)"))
    return ms


class MultiLinear(nn.Module):
    """K weights as constants; forward applies fn(x, *state_k) for every k (one graph)."""

    def __init__(self, fn, states):
        super().__init__()
        self.fn = fn
        self.k = len(states)
        self.nstate = len(states[0])
        for k, st in enumerate(states):
            for j, t in enumerate(st):
                if t.is_floating_point() and t.dtype in (FP32, BF16, FP16):
                    self.register_parameter(f"w{k}_{j}", nn.Parameter(t, requires_grad=False))
                else:  # int8 / fp8 / packed weights: plain buffers (also constants under freezing)
                    self.register_buffer(f"w{k}_{j}", t)

    def forward(self, x):
        return [self.fn(x, *[getattr(self, f"w{k}_{j}") for j in range(self.nstate)]) for k in range(self.k)]


def compile_fn(fn, mode: str):
    import torch._inductor.config as icfg
    icfg.freezing = "freeze" in mode
    m = None if mode in ("default", "freeze") else "max-autotune"
    return torch.compile(fn, mode=m, dynamic=False, fullgraph=True)


def _fail(row: "Row", e: Exception) -> "Row":
    msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
    row.note = f"FAILED: {type(e).__name__}: {msg}"
    return row


def build_linear_entry(meth: Method, master: torch.Tensor, M: int, x32: torch.Tensor, ref: torch.Tensor,
                       per_pool: int, compile_copies: int, row: "Row") -> Entry:
    N, K = master.shape
    st0 = meth.prepare(master, M)
    nb = N * K + 4 * N if meth.name.startswith("qdyn") else meth.nbytes(st0)  # qdyn: opaque packed params
    if nb <= 0:
        raise RuntimeError("could not size weight")
    min_copies = 1 if nb >= 64 * 2**20 else 2
    ncopy = max(min_copies, min(meth.max_copies, 4096, -(-per_pool // nb)))
    if meth.compile_mode and "freeze" in meth.compile_mode:
        ncopy = min(ncopy, compile_copies)
    states = [st0] + [meth.prepare(master, M) for _ in range(ncopy - 1)]
    x = x32.to(meth.xdtype)
    if meth.compile_mode is None:
        calls, div = [partial(meth.run, x, *st) for st in states], 1
    elif "freeze" in meth.compile_mode:
        cf = compile_fn(MultiLinear(meth.run, states).eval(), meth.compile_mode)
        t0 = time.perf_counter()
        cf(x)
        row.compile_s = time.perf_counter() - t0
        calls, div = [partial(cf, x)], len(states)
    else:
        cf = compile_fn(meth.run, meth.compile_mode)
        t0 = time.perf_counter()
        cf(x, *states[0])
        row.compile_s = time.perf_counter() - t0
        calls, div = [partial(cf, x, *st) for st in states], 1
    y = calls[0]()
    row.err = rel_err(y[0] if isinstance(y, (list, tuple)) else y, ref)
    row.copies = ncopy
    row.note = meth.note
    return Entry(row, calls, div, nb)


def run_linear_group(args, methods: list[Method], out: list[Row]):
    gen = torch.Generator().manual_seed(0)
    for sname in args.shapes:
        N, K = SHAPES[sname]
        master = torch.randn(N, K, generator=gen) * 0.02
        for M in args.M:
            x32 = torch.randn(M, K, generator=gen)
            ref = x32.double() @ master.double().t()
            ms = [m for m in methods if M <= m.m_max]
            per_pool = args.pool_mb * 2**20 // max(1, len(ms))
            entries, rows = [], []
            for meth in ms:
                row = Row("linear", f"{sname} {N}x{K}", M, meth.wdtype, meth.name, None, None, None)
                rows.append(row)
                try:
                    pass  # no torch._dynamo.reset() here: it would drop the entries compiled before
                    entries.append(build_linear_entry(meth, master, M, x32, ref, per_pool, args.compile_copies, row))
                except Exception as e:
                    _fail(row, e)
            interleave(entries, args.min_time)
            for row in rows:
                out.append(row)
                print_row(row, flush=True)
            del entries
            torch._dynamo.reset()
            gc.collect()


# --------------------------------------------------------------------------- #
# whole expert MLP: silu(x@w1.T) * (x@w3.T) @ w2.T
# --------------------------------------------------------------------------- #
def mlp_eager(x, w1, w3, w2):
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def mlp_eager_fused13(x, w13, w2):
    h = F.linear(x, w13)
    g, u = h.chunk(2, dim=-1)
    return F.linear(F.silu(g) * u, w2)


def mlp_packed(x, w13p, w2p):
    h = torch.ops.mkldnn._linear_pointwise(x, w13p, None, "none", [], "")
    g, u = h.chunk(2, dim=-1)
    return torch.ops.mkldnn._linear_pointwise(F.silu(g) * u, w2p, None, "none", [], "")


def mlp_mkl_packed(x, w13p, w13o, w2p, w2o):
    M = x.shape[0]
    h = torch.ops.mkl._mkl_linear(x, w13p, w13o, None, M)
    g, u = h.chunk(2, dim=-1)
    return torch.ops.mkl._mkl_linear(F.silu(g) * u, w2p, w2o, None, M)


def run_mlp_group(args, out: list[Row]):
    gen = torch.Generator().manual_seed(1)
    w1 = torch.randn(I, D, generator=gen) * 0.02
    w3 = torch.randn(I, D, generator=gen) * 0.02
    w2 = torch.randn(D, I, generator=gen) * 0.02
    for M in args.M:
        x32 = torch.randn(M, D, generator=gen)
        ref = mlp_eager(x32.double(), w1.double(), w3.double(), w2.double())
        for lab, dt in (("bf16", BF16), ("fp32", FP32)):
            nb = 3 * I * D * torch.empty((), dtype=dt).element_size()
            x = x32.to(dt)
            variants = [
                ("eager_w1_w3_w2", None, lambda: (w1.to(dt, copy=True), w3.to(dt, copy=True), w2.to(dt, copy=True)), mlp_eager),
                ("eager_w13_fused", None, lambda: (torch.cat([w1, w3]).to(dt), w2.to(dt, copy=True)), mlp_eager_fused13),
                ("mkldnn_packed_w13", None, lambda: (torch.ops.mkldnn._reorder_linear_weight(torch.cat([w1, w3]).to(dt), M),
                                                    torch.ops.mkldnn._reorder_linear_weight(w2.to(dt, copy=True), M)), mlp_packed),
            ]
            if dt == FP32:
                variants.append(("mkl_packed_w13", None, lambda: (torch.ops.mkl._mkl_reorder_linear_weight(torch.cat([w1, w3]), M), torch.cat([w1, w3]),
                                                                 torch.ops.mkl._mkl_reorder_linear_weight(w2.clone(), M), w2.clone()), mlp_mkl_packed))
            for mode in ("default", "freeze", "max-autotune", "freeze-max-autotune"):
                variants.append((f"compile_{mode}_w1_w3_w2", mode,
                                 lambda: (w1.to(dt, copy=True), w3.to(dt, copy=True), w2.to(dt, copy=True)), mlp_eager))
            per_pool = args.pool_mb * 2**20 // len(variants)
            ncopy = max(2, -(-per_pool // nb))
            entries, rows = [], []
            for name, mode, prep, fn_ in variants:
                row = Row("mlp", f"expert MLP 3x{I}x{D}", M, lab, name, None, None, None)
                rows.append(row)
                try:
                    pass  # (see run_linear_group: no reset between entries)
                    k = ncopy if (mode is None or "freeze" not in mode) else min(ncopy, args.compile_copies)
                    states = [prep() for _ in range(k)]
                    if mode is None:
                        calls, div = [partial(fn_, x, *st) for st in states], 1
                    elif "freeze" in mode:
                        cf = compile_fn(MultiLinear(fn_, states).eval(), mode)
                        t0 = time.perf_counter(); cf(x); row.compile_s = time.perf_counter() - t0
                        calls, div = [partial(cf, x)], len(states)
                    else:
                        cf = compile_fn(fn_, mode)
                        t0 = time.perf_counter(); cf(x, *states[0]); row.compile_s = time.perf_counter() - t0
                        calls, div = [partial(cf, x, *st) for st in states], 1
                    y = calls[0]()
                    row.err = rel_err(y[0] if isinstance(y, (list, tuple)) else y, ref)
                    row.copies = k
                    entries.append(Entry(row, calls, div, nb))
                except Exception as e:
                    _fail(row, e)
                states = None
            interleave(entries, args.min_time)
            for row in rows:
                out.append(row)
                print_row(row, flush=True)
            del entries
            torch._dynamo.reset()
            gc.collect()


# --------------------------------------------------------------------------- #
# MoE at M=1: 2 of 8 experts
# --------------------------------------------------------------------------- #
def moe_loop(x, idx, wts, w13, w2):
    out = torch.zeros_like(x)
    for j, e in enumerate(idx.tolist()):
        h = F.linear(x, w13[e])
        g, u = h.chunk(2, dim=-1)
        out += wts[j] * F.linear(F.silu(g) * u, w2[e])
    return out


def moe_bmm(x, idx, wts, w13, w2):
    a = w13[idx]                                     # [2, 2I, D] gathered copy
    b = w2[idx]                                      # [2, D, I]
    h = torch.bmm(x.expand(idx.numel(), -1, -1), a.transpose(1, 2))  # [2, 1, 2I]
    g, u = h.chunk(2, dim=-1)
    y = torch.bmm(F.silu(g) * u, b.transpose(1, 2))  # [2, 1, D]
    return (y * wts.view(-1, 1, 1).to(y.dtype)).sum(0)


def moe_bmm_index_select(x, idx, wts, w13, w2):
    a = torch.index_select(w13, 0, idx)
    b = torch.index_select(w2, 0, idx)
    h = torch.bmm(x.expand(idx.numel(), -1, -1), a.transpose(1, 2))
    g, u = h.chunk(2, dim=-1)
    y = torch.bmm(F.silu(g) * u, b.transpose(1, 2))
    return (y * wts.view(-1, 1, 1).to(y.dtype)).sum(0)


def moe_packed_list(x, idx, wts, w13p, w2p):
    out = torch.zeros_like(x)
    for j, e in enumerate(idx.tolist()):
        h = torch.ops.mkldnn._linear_pointwise(x, w13p[e], None, "none", [], "")
        g, u = h.chunk(2, dim=-1)
        out += wts[j] * torch.ops.mkldnn._linear_pointwise(F.silu(g) * u, w2p[e], None, "none", [], "")
    return out


def run_moe_group(args, out: list[Row]):
    E, topk = 8, 2
    gen = torch.Generator().manual_seed(2)
    w13m = torch.randn(E, 2 * I, D, generator=gen) * 0.02
    w2m = torch.randn(E, D, I, generator=gen) * 0.02
    x32 = torch.randn(1, D, generator=gen)
    for lab, dt in (("bf16", BF16), ("fp32", FP32)):
        esz = torch.empty((), dtype=dt).element_size()
        layer_bytes = E * 3 * I * D * esz
        nread = topk * 3 * I * D * esz
        x = x32.to(dt)
        variants = [
            ("loop_index_w13[e]_F.linear", moe_loop, lambda: (w13m.to(dt), w2m.to(dt))),
            ("bmm_gather_w13[idx]", moe_bmm, lambda: (w13m.to(dt), w2m.to(dt))),
            ("bmm_index_select", moe_bmm_index_select, lambda: (w13m.to(dt), w2m.to(dt))),
            ("loop_mkldnn_packed_list", moe_packed_list,
             lambda: ([torch.ops.mkldnn._reorder_linear_weight(w13m[e].to(dt), 1) for e in range(E)],
                      [torch.ops.mkldnn._reorder_linear_weight(w2m[e].to(dt), 1) for e in range(E)])),
        ]
        ncopy = max(2, -(-args.pool_mb * 2**20 // len(variants) // layer_bytes))
        g2 = torch.Generator().manual_seed(3)
        routes = []
        for _ in range(ncopy):
            idx = torch.randperm(E, generator=g2)[:topk]
            wts = torch.softmax(torch.randn(topk, generator=g2), 0)
            routes.append((idx, wts))
        idx0, wts0 = routes[0]
        ref = moe_loop(x32.double(), idx0, wts0.double(), w13m.double(), w2m.double())
        entries, rows = [], []
        for name, fn_, prep in variants:
            row = Row("moe", f"MoE E=8 top2 (w13 {2*I}x{D}, w2 {D}x{I})", 1, lab, name, None, None, None)
            rows.append(row)
            try:
                states = [prep() for _ in range(ncopy)]
                calls = [partial(fn_, x, r[0], r[1], *st) for r, st in zip(routes, states)]
                row.err = rel_err(calls[0](), ref)
                row.copies = ncopy
                row.note = "GB/s counts the 2 active experts' weights"
                entries.append(Entry(row, calls, 1, nread))
            except Exception as e:
                _fail(row, e)
            states = None
        interleave(entries, args.min_time)
        for row in rows:
            out.append(row)
            print_row(row, flush=True)
        del entries
        gc.collect()


# --------------------------------------------------------------------------- #
# fixed per-call overheads
# --------------------------------------------------------------------------- #
def run_overhead_group(args, out: list[Row]):
    a = torch.randn(1, 8)
    b = torch.randn(8, 8)
    ab = a.to(BF16)
    bb = b.to(BF16)
    big = torch.randn(1, 1024, dtype=BF16)
    logits = torch.randn(1, 8)
    idx = torch.tensor([1, 5])
    wts = torch.randn(1, 2)
    emb = torch.randn(32000, 1024, dtype=BF16)
    tok = torch.tensor([17])

    def noop():
        return None

    cadd = torch.compile(lambda t: t + 1, dynamic=False)
    cadd(a)
    cmlp = torch.compile(lambda t, w: F.silu(F.linear(t, w)) * t, dynamic=False)
    cmlp(a, b)
    cases = [
        ("python_noop_call", lambda: noop()),
        ("torch.empty(0)", lambda: torch.empty(0)),
        ("a.add_(0) [1x8]", lambda: a.add_(0)),
        ("a + 1 [1x8]", lambda: a + 1),
        ("F.linear tiny fp32 [1x8]x[8x8]", lambda: F.linear(a, b)),
        ("a @ b tiny fp32", lambda: a @ b),
        ("F.linear tiny bf16", lambda: F.linear(ab, bb)),
        ("F.silu [1x1024] bf16", lambda: F.silu(big)),
        ("rms_norm [1x1024] bf16", lambda: F.rms_norm(big, (1024,))),
        ("softmax [1x8]", lambda: torch.softmax(logits, -1)),
        ("topk(2) [1x8]", lambda: torch.topk(logits, 2, dim=-1)),
        ("idx.tolist() (2 elems)", lambda: idx.tolist()),
        ("wts[0,1].item()", lambda: wts[0, 1].item()),
        ("embedding lookup 1 tok", lambda: F.embedding(tok, emb)),
        ("view+chunk", lambda: big.view(1, 2, 512).chunk(2, dim=1)),
        ("torch.compile'd (t+1) call", lambda: cadd(a)),
        ("torch.compile'd small linear+silu call", lambda: cmlp(a, b)),
    ]
    for name, fn in cases:
        reps = 200

        def loop(fn=fn):
            for _ in range(reps):
                fn()
        sec, med = bench([loop], reps, args.min_time)
        row = Row("overhead", "-", 1, "-", name, sec * 1e3, None, None, note=f"{sec*1e6:.2f} us/call",
                  ms_med=med * 1e3, busy=QUIET["last_busy"])
        out.append(row)
        print_row(row, flush=True)


# --------------------------------------------------------------------------- #
# output
# --------------------------------------------------------------------------- #
HEADER = "| group | shape | M | wdtype | method | ms(min) | GB/s | ms(med) | rel_err | copies | compile_s | busy | note |"


def fmt_row(r: Row) -> str:
    f = lambda v, p: "-" if v is None else f"{v:.{p}f}"
    err = "-" if r.err is None else f"{r.err:.1e}"
    ms = "-" if r.ms is None else (f"{r.ms:.4f}" if r.ms < 0.1 else f"{r.ms:.3f}")
    med = "-" if r.ms_med is None else (f"{r.ms_med:.4f}" if r.ms_med < 0.1 else f"{r.ms_med:.3f}")
    return (f"| {r.group} | {r.shape} | {r.M} | {r.wdtype} | {r.method} | {ms} | {f(r.gbs, 1)} | {med} | {err} | "
            f"{r.copies or '-'} | {f(r.compile_s, 1)} | {'-' if r.busy is None else r.busy} | {r.note} |")


_printed_header = False


def print_row(r: Row, flush=False):
    global _printed_header
    if not _printed_header:
        print(HEADER)
        print("|---" * (HEADER.count("|") - 1) + "|")
        _printed_header = True
    print(fmt_row(r), flush=flush)


def summarize(rows: list[Row]) -> str:
    """Best method per (group, shape, M, wdtype) by ms."""
    best: dict[tuple, Row] = {}
    for r in rows:
        if r.ms is None or r.group not in ("linear", "mlp", "moe"):
            continue
        key = (r.group, r.shape, r.M, r.wdtype)
        if key not in best or r.ms < best[key].ms:
            best[key] = r
    lines = ["| group | shape | M | wdtype | best method | ms | GB/s |", "|---|---|---|---|---|---|---|"]
    for k in sorted(best, key=lambda k: (k[0], k[1], k[3], k[2])):
        r = best[k]
        lines.append(f"| {r.group} | {r.shape} | {r.M} | {r.wdtype} | {r.method} | {r.ms:.3f} | {r.gbs:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--groups", nargs="+", default=["overhead", "linear", "moe", "mlp"],
                    choices=["overhead", "linear", "moe", "mlp"])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--M", nargs="+", type=int, default=[1, 2, 16, 64])
    ap.add_argument("--methods", nargs="+", default=["*"], help="fnmatch patterns over linear method names")
    ap.add_argument("--skip", nargs="+", default=[], help="fnmatch patterns of linear methods to skip")
    ap.add_argument("--pool-mb", type=int, default=1024,
                    help="total size of the rotating weight copies (make it larger than the L3)")
    ap.add_argument("--compile-copies", type=int, default=16,
                    help="max weight copies frozen into one compiled graph (freezing modes)")
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds of timing per candidate (candidates are interleaved)")
    ap.add_argument("--quiet-wait", type=float, default=20.0,
                    help="shared machine: before each timing wait up to this many s for no other runnable thread")
    ap.add_argument("--gate-busy", type=int, default=0,
                    help="shared machine: take a sample only when at most this many other threads are runnable "
                         "(/proc/stat procs_running); -1 disables the gate")
    ap.add_argument("--gate-max-s", type=float, default=2.0, help="max wait of the gate per sample")
    ap.add_argument("--json", help="append rows as JSON lines to this file")
    ap.add_argument("--markdown", help="write the table + summary to this markdown file")
    ap.add_argument("--list", action="store_true", help="list linear methods and exit")
    args = ap.parse_args(argv)

    methods = [m for m in build_methods()
               if any(fnmatch.fnmatch(m.name, p) for p in args.methods)
               and not any(fnmatch.fnmatch(m.name, p) for p in args.skip)]
    if args.list:
        for m in build_methods():
            print(f"{m.name:42s} {m.note}")
        return
    QUIET["max_wait"] = args.quiet_wait
    QUIET["gate_busy"], QUIET["gate_max_s"] = args.gate_busy, args.gate_max_s
    torch.set_num_threads(args.threads)
    torch._dynamo.config.cache_size_limit = 1024
    torch._dynamo.config.accumulated_cache_size_limit = 4096
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}, pool {args.pool_mb} MiB", flush=True)
    rows: list[Row] = []
    print(f"# DRAM read probe (fp32 sum over 1 GiB) before: {read_probe():.1f} GB/s", flush=True)
    with torch.no_grad():
        if "overhead" in args.groups:
            run_overhead_group(args, rows)
        if "linear" in args.groups:
            run_linear_group(args, methods, rows)
        if "moe" in args.groups:
            run_moe_group(args, rows)
        if "mlp" in args.groups:
            run_mlp_group(args, rows)
    print(f"# DRAM read probe after: {read_probe():.1f} GB/s", flush=True)
    summ = summarize(rows)
    print("\n## Best per shape/M/dtype\n" + summ)
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r.as_dict()) + "\n")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"torch {torch.__version__}, threads {args.threads}, pool {args.pool_mb} MiB\n\n")
            f.write(HEADER + "\n" + "|---" * (HEADER.count("|") - 1) + "|\n")
            f.write("\n".join(fmt_row(r) for r in rows) + "\n\n## Best\n\n" + summ + "\n")


if __name__ == "__main__":
    main()
