#!/usr/bin/env python3
"""Fused-MoE kernel timing.

  python benchmarks/fused_moe_kernel.py gpu [--tokens 1 16 64 256 1024] [--sweep]
      Needs a CUDA GPU. Mixtral-8x7B expert shapes (D=4096, I=14336, E=8, top-2), one layer:
      the Triton kernel (bf16, fp8 w8a8, fp8 w8a16) against the PyTorch path `engine.moe.fused_moe`
      (bf16). Prints ms per call, the weight bytes the active experts hold, achieved weight
      bandwidth, the time floor those bytes set at the GPU's peak bandwidth, and the error
      against the PyTorch path. `--sweep` also times tile configs per batch (`sweep_configs`; whole
      calls replayed from CUDA graphs, bf16 and w8a8) against `engine.fused_moe_triton`'s tables.

  python benchmarks/fused_moe_kernel.py cpu-fp8 [--M 1 16]
      Can an fp8 weight matmul beat fp32 or bf16 `x @ W.T` on the "bench" expert shapes
      (w13 [7168, 1024], w2 [1024, 3584])? PyTorch's ways of running one (`engine.quant.fp8_linear`,
      torch.compile'd GEMVs) against the project's kernel (`engine.cpu_kernels.CpuLinear`). Weights
      are replicated into pools larger than the last-level cache so each call streams from DRAM;
      methods are interleaved and the best and median of several passes are printed (the box
      is shared: the best pass is the least disturbed one).

  python benchmarks/fused_moe_kernel.py cpu-kernels [--tokens 1 4 16 64 256 1024] [--layers 8]
      The CPU expert block on the "bench" shapes (D=1024, I=3584, E=8, top-2): the project's
      kernels (`engine.cpu_kernels`: bf16 in every build this CPU runs, and fp8) against the
      oneDNN per-expert path (`engine.moe.fused_moe`, bf16), over `--layers` layers of distinct
      weights (more than the last-level cache holds), so each call streams its experts from DRAM
      as in a real step. Prints ms per layer, GB/s of active expert weights (in their own bytes)
      and TFLOP/s, interleaved passes, best of them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import cpu_kernels  # noqa: E402
from engine.linear import Linear  # noqa: E402
from engine.moe import fused_moe, make_experts, select_experts  # noqa: E402
from engine.quant import fp8_linear, quantize_fp8  # noqa: E402

# ---- GPU: Triton kernel vs the PyTorch path -------------------------------------------------
D, I, E, TOP_K = 4096, 14336, 8, 2
PEAK_GBS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0, "L40S": 864.0}  # HBM / GDDR peak, GB/s


def sweep_configs(num_tokens: int) -> list[dict[str, int]]:
    """Tile configs `--sweep` tries: short, wide tiles that stream weights for decode-sized
    batches (<= 64 tokens), square tiles grouped for L2 reuse for prefill-sized ones."""
    if num_tokens <= 64:
        tiles = [(m, n, k, 1) for m in (16, 32) for n, k in ((32, 256), (64, 128), (64, 256), (128, 128))]
        launches = ((4, 3), (4, 4), (8, 4))
    else:
        tiles = [(m, n, k, 8) for m in (64, 128) for n, k in ((64, 64), (128, 64), (128, 128), (256, 64))]
        launches = ((4, 4), (8, 3), (8, 4))
    return [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=g, num_warps=w, num_stages=st)
            for m, n, k, g in tiles for w, st in launches]


def _peak_gbs(name: str) -> float | None:
    return next((v for k, v in PEAK_GBS.items() if k in name), None)


def _active_weight_bytes(topk_ids: torch.Tensor, bytes_per_param: float) -> float:
    active = int(torch.unique(topk_ids).numel())
    return active * 3 * D * I * bytes_per_param


def run_gpu(tokens: list[int], sweep: bool) -> None:
    from benchmarks.gpu_timing import timed
    from engine.fused_moe_triton import fused_moe_triton, tile_config

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    peak = _peak_gbs(name)
    print(f"{name}; peak {peak or '?'} GB/s; Mixtral-8x7B experts D={D} I={I} E={E} top-{TOP_K}, one layer")
    gen = torch.Generator(device=dev).manual_seed(0)
    w13 = (torch.randn(E, 2 * I, D, device=dev, generator=gen) * D**-0.5).to(torch.bfloat16)  # [E, 2I, D]
    w2 = (torch.randn(E, D, I, device=dev, generator=gen) * I**-0.5).to(torch.bfloat16)  # [E, D, I]
    w13_8, s13 = quantize_fp8(w13, per_channel=True)  # [E, 2I, D] fp8, [E, 2I]
    w2_8, s2 = quantize_fp8(w2, per_channel=True)  # [E, D, I] fp8, [E, D]
    print(f"{'T':>5} {'path':<22} {'ms':>8} {'GB/s':>8} {'%peak':>6} {'floor ms':>9} {'TFLOP/s':>8} {'rel err':>8}")
    for t in tokens:
        x = torch.randn(t, D, device=dev, generator=gen).to(torch.bfloat16)  # [T, D]
        weights, ids = select_experts(torch.randn(t, E, device=dev, generator=gen), TOP_K)  # [T, k]
        experts = make_experts(w13, w2)  # the torch path's per-expert views
        ref = fused_moe(x, experts, weights, ids).float()  # [T, D]
        flops = 2 * t * TOP_K * 3 * D * I
        paths: list[tuple[str, float, Callable[[], torch.Tensor]]] = [
            ("torch bf16", 2, lambda: fused_moe(x, experts, weights, ids)),
            ("triton bf16", 2, lambda: fused_moe_triton(x, w13, w2, weights, ids)),
            ("triton fp8 w8a8", 1, lambda: fused_moe_triton(x, w13_8, w2_8, weights, ids, s13, s2)),
            ("triton fp8 w8a16", 1,
             lambda: fused_moe_triton(x, w13_8, w2_8, weights, ids, s13, s2, quantize_activations=False)),
        ]
        for label, bpp, fn in paths:
            err = float((fn().float() - ref).norm() / ref.norm())
            ms = timed(fn, 50)[0]
            nbytes = _active_weight_bytes(ids, bpp)
            floor = f"{nbytes / (peak * 1e9) * 1e3:9.3f}" if peak else f"{'?':>9}"
            pct = f"{100 * nbytes / (ms * 1e-3) / (peak * 1e9):6.1f}" if peak else f"{'?':>6}"
            print(f"{t:5d} {label:<22} {ms:8.3f} {nbytes / ms / 1e6:8.0f} {pct} {floor} "
                  f"{flops / ms / 1e9:8.1f} {err:8.1e}")
        if sweep:  # whole calls replayed from CUDA graphs: the kernels' time, as a graphed decode step
            for bf, a, b, sa, sb in (("bf16", w13, w2, None, None), ("fp8 w8a8", w13_8, w2_8, s13, s2)):
                timed_cfgs = sorted(
                    (timed(lambda: fused_moe_triton(x, a, b, weights, ids, sa, sb, quantize_activations=True,
                                                    config=cfg), 20)[0], i, cfg)
                    for i, cfg in enumerate([tile_config(t, fp8_dots=sa is not None), *sweep_configs(t)])
                )
                table_ms = next(ms for ms, i, _ in timed_cfgs if i == 0)
                best = "; ".join(f"{ms:.3f} ms {cfg}" for ms, _, cfg in timed_cfgs[:3])
                print(f"{t:5d} sweep {bf}: table {table_ms:.3f} ms; best {best}", flush=True)


# ---- CPU: fp8 weight matmul vs fp32 / bf16 ---------------------------------------------------
SHAPES = {"w13": (7168, 1024), "w2": (1024, 3584)}  # (N, K) of W [N, K], the "bench" preset


def _mulsum(x: torch.Tensor, w8: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    # torch.compile fuses the conversion into a vectorised multiply-reduce GEMV.
    return ((x[:, None, :].float() * w8[None].float()).sum(-1) * s).to(x.dtype)  # [M, N]


def _fp8_bits_to_f32(w8: torch.Tensor) -> torch.Tensor:
    # e4m3 bits placed in fp32's low exponent / high mantissa bits, then 2^120 fixes the bias
    # (7 vs 127): exact, subnormals included, and only integer ops a compiler vectorises.
    b = w8.view(torch.uint8).to(torch.int32)
    return (((b & 0x7F) << 20) | ((b & 0x80) << 24)).view(torch.float32) * 2.0**120


def _mulsum_bits(x: torch.Tensor, w8: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return ((x[:, None, :].float() * _fp8_bits_to_f32(w8)[None]).sum(-1) * s).to(x.dtype)  # [M, N]


def _deq_linear(x: torch.Tensor, w8: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w8.to(x.dtype)) * s.to(x.dtype)  # [M, N]


def _blockwise(convert: Callable[[torch.Tensor], torch.Tensor], rows: int) -> Callable[..., torch.Tensor]:
    # Convert `rows` weight rows at a time into a buffer that stays in cache, then matmul them.
    def run(x: torch.Tensor, w8: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape[0], w8.shape[0], dtype=x.dtype)  # [M, N]
        for r in range(0, w8.shape[0], rows):
            out[:, r : r + rows] = x @ convert(w8[r : r + rows]).t()
        return out * s.to(x.dtype)

    return run


def run_cpu(ms_: list[int], pool_mb: int, passes: int) -> None:
    isas = cpu_kernels.available_isas()
    if not isas:
        sys.exit("the fp8 CPU kernel does not run here (it needs AVX512-BF16 and gcc)")
    isa = isas[0]
    compiled_mulsum = torch.compile(_mulsum, dynamic=False)
    compiled_deq = torch.compile(_deq_linear, dynamic=False)
    compiled_bits = torch.compile(_mulsum_bits, dynamic=False)
    bits_f32 = torch.compile(_fp8_bits_to_f32, dynamic=False)
    to_f32 = torch.compile(lambda w: w.to(torch.float32), dynamic=False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; pools of >= {pool_mb} MiB per format")
    print(f"{'shape':<6} {'M':>3} {'method':<40} {'best ms':>8} {'med ms':>8} {'GB/s':>6} {'rel err':>8}")
    gen = torch.Generator().manual_seed(0)
    for sname, (n, k) in SHAPES.items():
        master = torch.randn(n, k, generator=gen) * k**-0.5  # [N, K]
        w8, scale = quantize_fp8(master, per_channel=True)  # [N, K], [N]
        for m in ms_:
            x32 = torch.randn(m, k, generator=gen)  # [M, K]
            xbf = x32.bfloat16()
            ref = x32.double() @ master.double().t()  # [M, N]
            # One pool per weight format, shared by the methods that read it: (copies, bytes of one).
            makers: dict[str, tuple[Callable[[], tuple], int]] = {
                "fp32": (lambda: (master.clone(),), n * k * 4),
                "bf16": (lambda: (master.bfloat16(),), n * k * 2),
                "bf16 onednn": (lambda: (Linear(master.bfloat16()),), n * k * 2),
                "fp8": (lambda: (w8.clone(), scale.clone()), n * k + n * 4),
                "fp8 kernel": (lambda: (Linear(w8, scale, isa=isa),), n * k + n * 4),
            }
            pools = {fmt: ([make() for _ in range(1 + pool_mb * 2**20 // nbytes)], nbytes)
                     for fmt, (make, nbytes) in makers.items()}
            methods: list[tuple[str, torch.Tensor, str, Callable[..., torch.Tensor]]] = [
                ("fp32 x @ W.T", x32, "fp32", lambda x, w: x @ w.t()),
                ("bf16 x @ W.T", xbf, "bf16", lambda x, w: x @ w.t()),
                ("bf16 engine Linear (oneDNN packed)", xbf, "bf16 onednn", lambda x, lin: lin(x)),
                ("fp8 engine Linear (CPU kernel)", xbf, "fp8 kernel", lambda x, lin: lin(x)),
                ("fp8 fp8_linear (x fp32)", x32, "fp8", fp8_linear),
                ("fp8 fp8_linear (x bf16)", xbf, "fp8", fp8_linear),
                ("fp8 compiled mul-sum GEMV (x fp32)", x32, "fp8", compiled_mulsum),
                ("fp8 compiled bit-trick GEMV (x fp32)", x32, "fp8", compiled_bits),
                ("fp8 compiled dequant+linear (x fp32)", x32, "fp8", compiled_deq),
                ("fp8 compiled dequant+linear (x bf16)", xbf, "fp8", compiled_deq),
                ("fp8 blockwise 256 rows -> fp32", x32, "fp8", _blockwise(to_f32, 256)),
                ("fp8 blockwise 256 rows bit-trick -> fp32", x32, "fp8", _blockwise(bits_f32, 256)),
            ]
            for _, x, fmt, fn in methods:
                fn(x, *pools[fmt][0][0])  # compile / warm up
            times: list[list[float]] = [[] for _ in methods]
            for _ in range(passes):  # interleaved, so a busy moment hits every method alike
                for (_, x, fmt, fn), ts in zip(methods, times):
                    copies = pools[fmt][0]
                    start = time.perf_counter()
                    for w in copies:
                        fn(x, *w)
                    ts.append((time.perf_counter() - start) / len(copies))
            for (label, x, fmt, fn), ts in zip(methods, times):
                copies, nbytes = pools[fmt]
                err = float((fn(x, *copies[0]).double() - ref).norm() / ref.norm())
                best, med = min(ts), statistics.median(ts)
                print(f"{sname:<6} {m:3d} {label:<40} {best * 1e3:8.3f} {med * 1e3:8.3f} "
                      f"{nbytes / best / 1e9:6.1f} {err:8.1e}", flush=True)
            del pools


def run_cpu_kernels(tokens: list[int], layers: int, passes: int) -> None:
    isas = cpu_kernels.available_isas()
    if not isas:
        sys.exit("the CPU kernels do not run here (they need AVX512-BF16 or AMX, and gcc)")
    e, d, inter, top_k = 8, 1024, 3584, 2
    gen = torch.Generator().manual_seed(0)
    kernels: dict[str, list[cpu_kernels.CpuExperts]] = {}
    onednn = []
    for _ in range(layers):
        w13 = torch.randn(e, 2 * inter, d, generator=gen) * d**-0.5  # [E, 2I, D]
        w2 = torch.randn(e, d, inter, generator=gen) * inter**-0.5  # [E, D, I]
        (q13, s13), (q2, s2) = quantize_fp8(w13, per_channel=True), quantize_fp8(w2, per_channel=True)
        for isa in isas:
            kernels.setdefault(f"{isa} bf16", []).append(cpu_kernels.CpuExperts(isa, w13.bfloat16(), w2.bfloat16()))
        # fp8 runs on AVX512-BF16 in every build: one build's timing is the figure.
        kernels.setdefault("fp8", []).append(cpu_kernels.CpuExperts(isas[0], q13, q2, s13, s2))
        onednn.append(make_experts(w13.bfloat16(), w2.bfloat16()))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {layers} layers of bench experts")
    print(f"{'tokens':>6} {'experts':>7} {'path':<16} {'ms/layer':>9} {'GB/s':>6} {'TFLOP/s':>8}")
    for t in tokens:
        x = torch.randn(t, d, generator=gen).bfloat16()  # [T, D]
        weights, ids = select_experts(torch.randn(t, e, generator=gen), top_k)  # [T, k]
        paths: dict[str, Callable[[int], torch.Tensor]] = {
            name: (lambda i, ks=ks: ks[i](x, weights, ids)) for name, ks in kernels.items()
        }
        paths["oneDNN bf16"] = lambda i: fused_moe(x, onednn[i], weights, ids)
        best = {name: float("inf") for name in paths}
        for _ in range(passes):  # interleaved, so a busy moment hits every path alike
            for name, fn in paths.items():
                start = time.perf_counter()
                for i in range(layers):
                    fn(i)
                best[name] = min(best[name], (time.perf_counter() - start) / layers)
        active = int(torch.unique(ids).numel())
        flops = t * top_k * 3 * d * inter * 2
        for name, sec in best.items():
            nbytes = active * 3 * d * inter * (1 if name == "fp8" else 2)
            print(f"{t:6d} {active:7d} {name:<16} {sec * 1e3:9.2f} {nbytes / sec / 1e9:6.1f} {flops / sec / 1e12:8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    gpu = sub.add_parser("gpu", help="Triton fused MoE vs the torch path on a CUDA GPU")
    gpu.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 256, 1024])
    gpu.add_argument("--sweep", action="store_true", help="also time a few tile configs per batch")
    cpu = sub.add_parser("cpu-fp8", help="fp8 weight matmul variants vs fp32/bf16 on the CPU")
    cpu.add_argument("--M", type=int, nargs="+", default=[1, 16])
    cpu.add_argument("--pool-mb", type=int, default=768, help="weight bytes per format (> last-level cache)")
    cpu.add_argument("--passes", type=int, default=7)
    kern = sub.add_parser("cpu-kernels", help="the CPU expert kernels (bf16, fp8) vs oneDNN per-expert matmuls")
    kern.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024])
    kern.add_argument("--layers", type=int, default=8)
    kern.add_argument("--passes", type=int, default=5)
    args = parser.parse_args()
    if args.cmd == "cpu-kernels":
        run_cpu_kernels(args.tokens, args.layers, args.passes)
    elif args.cmd == "gpu":
        if not torch.cuda.is_available():
            sys.exit("the gpu benchmark needs a CUDA GPU")
        run_gpu(args.tokens, args.sweep)
    else:
        run_cpu(args.M, args.pool_mb, args.passes)


if __name__ == "__main__":
    main()
