"""The project's CPU kernels (engine/cpu_kernels.c), built on first use: the whole expert block of
a layer in one call (`CpuExperts`), dense projections (`CpuLinear`), the residual add with its
RMSNorm (`AddRMSNorm`), decode attention over the paged cache (`DecodeAttention`), the rotary
with the K/V cache write (`RopeAndCache`) and Mixtral's routing (`Router`).

Two builds of the one source, by instruction set (`Isa`):
  "amx":    bf16 weight panels on Intel AMX tiles (Sapphire Rapids and later);
  "avx512": bf16 weight panels on AVX512-BF16 `vdpbf16ps` (AMD Zen 4/5, Intel Sapphire Rapids and later).
fp8 (e4m3) weights run on AVX512-BF16 in both builds, widened to bf16 in registers (AVX512-VBMI
byte lookups), so a decode step reads one byte a weight.

The kernel is plain C with no Python or torch headers, so building it takes about a second with
the system's gcc; it is loaded with ctypes, which releases the GIL for the call. It links the
OpenMP runtime torch already loaded (same soname), so both share one thread pool.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Literal

import torch

from engine.quant import FP8

log = logging.getLogger(__name__)

Isa = Literal["amx", "avx512"]
IsaChoice = Literal["auto", "amx", "avx512", "off"]

_SOURCE = Path(__file__).with_name("cpu_kernels.c")
_AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vbmi"]
_COMPILE: dict[Isa, list[str]] = {
    "avx512": ["-O3", "-ffast-math", "-fPIC", "-fopenmp", *_AVX512],
    "amx": ["-O3", "-ffast-math", "-fPIC", "-fopenmp", *_AVX512, "-mamx-tile", "-mamx-bf16", "-DKERNELS_AMX"],
}
# NOTE: -ffast-math only when compiling (it lets gcc call glibc's vector expf). Given to the link
# step, gcc adds crtfastmath.o, which switches the whole process to flush-to-zero on load.
_LINK = ["-shared", "-fopenmp", "-lm"]
_CPU_FLAGS: dict[Isa, set[str]] = {
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512vbmi"},
    "amx": {"amx_tile", "amx_bf16", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512vbmi"},
}
# Rows of one AMX tile: each expert's rows are padded to a multiple of it (cpu_kernels.c).
TILE_ROWS = 16
# NOTE: a call that touches less than this runs on one thread: waking the others costs more than
# they save, and their spin-wait afterwards takes cores from the serving processes beside us.
_PARALLEL_BYTES = 1 << 20


def _threads(nbytes: int) -> int:
    """Threads for a kernel call that reads about `nbytes` of weights and activations."""
    return torch.get_num_threads() if nbytes >= _PARALLEL_BYTES else 1


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mixtral-serve"


@functools.cache
def _cpu_flags() -> frozenset[str]:
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return frozenset()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def _build(isa: Isa) -> Path:
    """The compiled kernel for `isa`, cached by a hash of its source and flags."""
    flags = _COMPILE[isa]
    digest = hashlib.sha256(_SOURCE.read_bytes() + " ".join(flags + _LINK).encode()).hexdigest()[:16]
    lib = _cache_dir() / f"cpu_kernels-{isa}-{digest}.so"
    if lib.exists():
        return lib
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("no C compiler (gcc) on PATH")
    lib.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target, then rename: processes starting together never load a partial file.
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        obj, out = Path(tmp) / "cpu_kernels.o", Path(tmp) / lib.name
        try:
            for cmd in ([compiler, *flags, "-c", str(_SOURCE), "-o", str(obj)], [compiler, str(obj), "-o", str(out), *_LINK]):
                subprocess.run(cmd, check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"building {_SOURCE.name} for {isa} failed:\n{e.stderr}") from e
        os.replace(out, lib)
    return lib


@functools.cache
def _library(isa: Isa) -> ctypes.CDLL | None:
    """The loaded kernel for `isa`, or None where it cannot run (CPU lacks it, no compiler)."""
    if not _CPU_FLAGS[isa] <= _cpu_flags():
        return None
    try:
        lib = ctypes.CDLL(str(_build(isa)))
    except (OSError, RuntimeError) as e:
        log.warning("CPU kernels (%s) unavailable, using oneDNN and PyTorch ops: %s", isa, e)
        return None
    if lib.kernels_init() != 0:
        log.warning("the kernel refused AMX tile data (arch_prctl); using oneDNN and PyTorch ops")
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.moe_forward.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr]
    lib.moe_forward.restype = None
    lib.linear.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ptr, i64, ptr]
    lib.linear.restype = None
    lib.add_rms_norm.argtypes = [ptr, ptr, ptr, ctypes.c_float, i64, i64, i64, ptr]
    lib.add_rms_norm.restype = None
    lib.decode_attention.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, ptr, ptr]
    lib.decode_attention.restype = None
    lib.rope_and_cache.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, ptr, ptr]
    lib.rope_and_cache.restype = None
    lib.route.argtypes = [ptr, ptr, i64, i64, i64, i64, i64, ptr, ptr]
    lib.route.restype = None
    lib.lora_add.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, i64, i64, ptr, i64, ptr, i64, i64, ptr]
    lib.lora_add.restype = None
    return lib


def available_isas() -> list[Isa]:
    """The builds this machine runs, best first."""
    return [isa for isa in ("amx", "avx512") if _library(isa) is not None]


def resolve_isa(choice: IsaChoice, device: torch.device, dtype: torch.dtype) -> Isa | None:
    """The kernels' instruction set for `choice` ("auto": the best this CPU runs, for bf16 models)."""
    if choice == "off" or device.type != "cpu":
        return None
    isas = available_isas()
    if choice == "auto":
        return isas[0] if isas and dtype == torch.bfloat16 else None
    if choice not in isas:
        raise ValueError(f"cpu_kernels {choice!r} does not run here: this CPU runs {isas or 'none of them'}")
    if dtype != torch.bfloat16:
        raise ValueError(f"cpu_kernels {choice!r} needs bfloat16 activations, not {dtype}")
    return choice


def fits_experts(hidden: int, intermediate: int) -> bool:
    """Whether the expert kernel takes this (per-rank) shape: whole panels and K chunks."""
    return hidden % 64 == 0 and intermediate % 32 == 0


def fits_linear(out_features: int, in_features: int) -> bool:
    return out_features % 64 == 0 and in_features % 32 == 0


def fits_attention(n_heads: int, n_kv_heads: int, head_dim: int) -> bool:
    """Whether decode attention takes this head layout (ATTN_MAX_HD, ATTN_MAX_GROUP in the C)."""
    return head_dim % 16 == 0 and head_dim <= 256 and n_heads // n_kv_heads <= 16


def pack_w13(w13: torch.Tensor) -> torch.Tensor:
    """w13 [E, 2I, D] (w1 rows, then w3 rows) as tiles: [E, I/32, D/32, 2 (w1, w3), 2, 16, 16, 2].

    Panel p holds w1 and w3 output columns [32p, 32p + 32); each tile is 16 K-pairs x 16 columns
    x the pair, so (r, c, j) is W[col c][k 2r + j] of its 32-wide K chunk. Any element type.
    """
    e, two_i, d = w13.shape
    w = w13.view(e, 2, two_i // 64, 2, 16, d // 32, 16, 2)  # [E, w1|w3, p, half, col, kc, r, j]
    return w.permute(0, 2, 5, 1, 3, 6, 4, 7).contiguous()


def pack_w13_scales(scale: torch.Tensor) -> torch.Tensor:
    """Per-row scales of w13 [E, 2I] in the panels' column order: [E, I/32, 64] (32 w1, then 32 w3)."""
    e, two_i = scale.shape
    return scale.float().view(e, 2, two_i // 64, 32).transpose(1, 2).reshape(e, two_i // 64, 64).contiguous()


def pack_panels(w: torch.Tensor) -> torch.Tensor:
    """W [..., N, K] as tiles [..., N/64, K/32, 4, 16, 16, 2]: panel p holds output columns
    [64p, 64p + 64) as 4 tiles of 16 columns (for w2 [E, D, I] and dense weights [N, K])."""
    *lead, n, k = w.shape
    v = w.reshape(-1, n // 64, 4, 16, k // 32, 16, 2)  # [B, p, sub, col, kc, r, j]
    return v.permute(0, 1, 4, 2, 5, 3, 6).reshape(*lead, n // 64, k // 32, 4, 16, 16, 2).contiguous()


def interleave_fp8(tiles: torch.Tensor) -> torch.Tensor:
    """fp8 tiles (`pack_w13` / `pack_panels` over bytes) in the order the kernel widens them: per K
    chunk of a panel (4 tiles, 2,048 bytes) and K pair r, 128 contiguous bytes, the 32 weights of
    tiles 0 and 1 and then of 2 and 3 interleaved 8 by 8 ([r, pair, 4, 2, 8]), because the
    byte-to-word interleave that widens them works within 128-bit lanes (cpu_kernels.c)."""
    v = tiles.reshape(-1, 2, 2, 16, 4, 8)  # [chunk, pair, tile in pair, r, group of 8, byte]
    return v.permute(0, 3, 1, 4, 2, 5).reshape(tiles.shape).contiguous()


def _packed(tiles: torch.Tensor) -> torch.Tensor:
    return interleave_fp8(tiles) if tiles.dtype == torch.uint8 else tiles


def _bytes(w: torch.Tensor) -> torch.Tensor:
    # fp8 tiles are packed over bytes: the same permutations, and the kernel reads uint8.
    return w.view(torch.uint8) if w.dtype == FP8 else w


def _weights(w: torch.Tensor, scale: torch.Tensor | None) -> None:
    if w.dtype == FP8:
        assert scale is not None and scale.shape == w.shape[:-1], "fp8 weights need one scale per output row"
    else:
        assert w.dtype == torch.bfloat16 and scale is None, "bf16 weights, or fp8 with per-row scales"


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class CpuExperts:
    """Every expert of one layer (this rank's slice), packed for the kernel: bf16, or fp8 with one
    scale per output row (w13_scale [E, 2I], w2_scale [E, D])."""

    def __init__(
        self,
        isa: Isa,
        w13: torch.Tensor,  # [E, 2I, D]
        w2: torch.Tensor,  # [E, D, I]
        w13_scale: torch.Tensor | None = None,
        w2_scale: torch.Tensor | None = None,
    ) -> None:
        lib = _library(isa)
        assert lib is not None and fits_experts(w2.shape[1], w2.shape[2]), "resolve the ISA and check the shape first"
        _weights(w13, w13_scale)
        _weights(w2, w2_scale)
        self._forward = lib.moe_forward
        self.num_experts, self.hidden, self.intermediate = w2.shape
        self.w13 = _packed(pack_w13(_bytes(w13)))
        self.w2 = _packed(pack_panels(_bytes(w2)))
        self.w13_scale = None if w13_scale is None else pack_w13_scales(w13_scale)  # [E, I/32, 64]
        self.w2_scale = None if w2_scale is None else w2_scale.float().contiguous()  # [E, D]

    def _bytes(self, ids: torch.Tensor) -> int:
        """Weight bytes a call streams: the experts it routes to (at most all of them)."""
        per_expert = (self.w13.numel() * self.w13.element_size() + self.w2.numel() * self.w2.element_size()) // self.num_experts
        return min(ids.numel(), self.num_experts) * per_expert

    def __call__(
        self,
        x: torch.Tensor,  # [T, D] bf16
        topk_weights: torch.Tensor,  # [T, k] fp32
        topk_ids: torch.Tensor,  # [T, k]
    ) -> torch.Tensor:
        """sum_k weight_k * expert_k(x) for each token, [T, D] bf16."""
        return self.run(x, topk_weights, topk_ids)[0]

    def run(
        self,
        x: torch.Tensor,  # [T, D] bf16
        topk_weights: torch.Tensor,  # [T, k] fp32
        topk_ids: torch.Tensor,  # [T, k]
        delta13: torch.Tensor | None = None,  # [T*k, 2I] fp32, added before the activation (LoRA)
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The block's output [T, D] bf16 and, with `delta13`, each (token, choice) pair's activation
        [T*k, I] (what a LoRA on w2 multiplies)."""
        t, k = topk_ids.shape
        d, i, e = self.hidden, self.intermediate, self.num_experts
        rows = t * k + e * (TILE_ROWS - 1)  # every expert's rows padded to whole tiles
        x = x.contiguous()
        ids = topk_ids.to(torch.int64).contiguous()  # [T, k]
        weights = topk_weights.to(torch.float32).contiguous()  # [T, k]
        delta = None if delta13 is None else delta13.to(torch.float32).contiguous()  # [T*k, 2I]
        out = torch.empty(t, d, dtype=torch.bfloat16)  # [T, D]
        xs = torch.empty(rows, d, dtype=torch.bfloat16)  # [R, D] tokens grouped by expert
        act = torch.empty(rows, i, dtype=torch.bfloat16)  # [R, I] silu(x w1) * (x w3)
        y = torch.empty(rows, d, dtype=torch.float32)  # [R, D] second matmul, fp32
        slot_of = torch.empty(t * k, dtype=torch.int32)  # [T k] row of each (token, choice)
        self._forward(
            x.data_ptr(), ids.data_ptr(), weights.data_ptr(), t, k, e, d, i, _threads(self._bytes(ids)),
            self.w13.data_ptr(), self.w2.data_ptr(), _ptr(self.w13_scale), _ptr(self.w2_scale), _ptr(delta),
            out.data_ptr(), xs.data_ptr(), act.data_ptr(), y.data_ptr(), slot_of.data_ptr(),
        )
        return out, None if delta13 is None else act.index_select(0, slot_of.long())


class CpuLinear:
    """y = x @ W.T for one weight W [N, K] packed for the kernel: bf16, or fp8 with scale [N]."""

    def __init__(self, isa: Isa, weight: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        lib = _library(isa)
        assert lib is not None and fits_linear(*weight.shape), "resolve the ISA and check the shape first"
        _weights(weight, scale)
        self._linear = lib.linear
        self.out_features, self.in_features = weight.shape
        self.packed = _packed(pack_panels(_bytes(weight)))
        self.scale = None if scale is None else scale.float().contiguous()  # [N]

    def __call__(self, x: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """x [M, K] bf16 -> [M, N] in `out_dtype` (bf16, or fp32 straight from the accumulators)."""
        m, k = x.shape
        x = x.contiguous()
        out = torch.empty(m, self.out_features, dtype=out_dtype)  # [M, N]
        xs = torch.empty(-(-m // TILE_ROWS) * TILE_ROWS, k, dtype=torch.bfloat16)  # [M padded, K]
        self._linear(
            x.data_ptr(), m, k, self.out_features, _threads(self.packed.numel() * self.packed.element_size()),
            self.packed.data_ptr(), _ptr(self.scale),
            out.data_ptr(), out_dtype == torch.float32, xs.data_ptr(),
        )
        return out


class AddRMSNorm:
    """RMSNorm over bf16 rows, optionally after the residual add that precedes it, in one pass.

    NOTE: an eager bf16 `F.rms_norm` on CPU is about eight ops (upcast, square, mean, rsqrt, ...),
    each a pass over the rows; with the add before it, that is ~200 us a call at 64 rows.
    """

    def __init__(self, isa: Isa, weight: torch.Tensor, eps: float) -> None:
        lib = _library(isa)
        assert lib is not None and weight.dtype == torch.bfloat16, "bf16 weights, on a resolved ISA"
        self._kernel = lib.add_rms_norm
        self.weight = weight.contiguous()
        self.eps = eps

    def __call__(self, h: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
        """normed [T, D] of h [T, D]; with `delta`, h += delta first, in place."""
        t, d = h.shape
        assert h.is_contiguous() and h.dtype == torch.bfloat16
        normed = torch.empty_like(h)  # [T, D]
        delta_ptr = None
        if delta is not None:
            delta = delta.contiguous()
            delta_ptr = delta.data_ptr()
        self._kernel(h.data_ptr(), delta_ptr, self.weight.data_ptr(), self.eps, t, d, _threads(h.numel() * 6),
                     normed.data_ptr())
        return normed


class DecodeAttention:
    """Attention of one query token per sequence over its paged bf16 K/V, read in place.

    NOTE: the PyTorch path gathers every sequence's context into [B, KVH, L, hd] copies of K and V
    before SDPA; at 64 sequences that gather and SDPA take ~8 ms of a ~100 ms step here.
    """

    def __init__(self, isa: Isa, n_heads: int, n_kv_heads: int, head_dim: int) -> None:
        lib = _library(isa)
        assert lib is not None and fits_attention(n_heads, n_kv_heads, head_dim), "resolve the ISA, check the shape"
        self._kernel = lib.decode_attention
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim

    def __call__(
        self,
        q: torch.Tensor,  # [B, H, hd] bf16
        k_cache: torch.Tensor,  # [S, KVH, hd] bf16
        v_cache: torch.Tensor,  # [S, KVH, hd] bf16
        slots: torch.Tensor,  # [B, L] cache slot of each context position
        first: torch.Tensor,  # [B] first visible position (sliding window), int64
        last: torch.Tensor,  # [B] the query's own position, int64
    ) -> torch.Tensor:
        b, length = slots.shape
        threads = _threads(2 * b * length * self.n_kv_heads * self.head_dim * k_cache.element_size())  # K and V read
        q, slots = q.contiguous(), slots.contiguous()
        group = self.n_heads // self.n_kv_heads
        scores = torch.empty(threads, group, length, dtype=torch.float32)  # [threads, G, L]
        out = torch.empty(b, self.n_heads, self.head_dim, dtype=torch.bfloat16)  # [B, H, hd]
        self._kernel(
            q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(), first.data_ptr(), last.data_ptr(),
            b, self.n_heads, self.n_kv_heads, self.head_dim, length, threads, scores.data_ptr(), out.data_ptr(),
        )
        return out


class RopeAndCache:
    """Rotary embeddings on this step's query and key heads, in place in the fused qkv rows, and
    the keys and values written to the paged cache: one pass instead of about eight ops."""

    def __init__(self, isa: Isa, n_heads: int, n_kv_heads: int, head_dim: int) -> None:
        lib = _library(isa)
        assert lib is not None, "resolve the ISA first"
        self._kernel = lib.rope_and_cache
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim

    def __call__(
        self,
        qkv: torch.Tensor,  # [T, H + 2 KVH, hd] bf16, rotated in place
        cos: torch.Tensor,  # [T, 1, hd] bf16
        sin: torch.Tensor,  # [T, 1, hd] bf16
        slots: torch.Tensor,  # [T] int64 cache slot of each token
        k_cache: torch.Tensor,  # [S, KVH, hd] bf16
        v_cache: torch.Tensor,  # [S, KVH, hd] bf16
    ) -> None:
        assert qkv.is_contiguous() and cos.is_contiguous() and sin.is_contiguous() and slots.dtype == torch.int64
        self._kernel(
            qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), slots.contiguous().data_ptr(), qkv.shape[0],
            self.n_heads, self.n_kv_heads, self.head_dim, _threads(qkv.numel() * 4), k_cache.data_ptr(),
            v_cache.data_ptr(),
        )


class Router:
    """Mixtral's routing in one call: logits against the fp32 gate, softmax, top-k, renormalised."""

    def __init__(self, isa: Isa, gate: torch.Tensor, top_k: int) -> None:
        lib = _library(isa)
        assert lib is not None, "resolve the ISA first"
        self._kernel = lib.route
        self.gate = gate.float().contiguous()  # [E, D]
        self.top_k = top_k

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] bf16 -> (weights [T, k] fp32, ids [T, k] int64), as `engine.moe.select_experts`."""
        t, d = x.shape
        x = x.contiguous()
        ids = torch.empty(t, self.top_k, dtype=torch.int64)  # [T, k]
        weights = torch.empty(t, self.top_k, dtype=torch.float32)  # [T, k]
        self._kernel(x.data_ptr(), self.gate.data_ptr(), t, d, self.gate.shape[0], self.top_k,
                     _threads(x.numel() * 2 * self.gate.shape[0]), ids.data_ptr(), weights.data_ptr())
        return weights, ids


class LoRAKernel:
    """out += each row's adapter LoRA, for bf16 stacks A [G, nR, K] and B transposed [G, R, N]
    (engine/lora_ops.py has the contract and the PyTorch paths)."""

    def __init__(self, isa: Isa) -> None:
        lib = _library(isa)
        assert lib is not None, "resolve the ISA first"
        self._kernel = lib.lora_add
        self._splits: dict[tuple[int, ...], torch.Tensor] = {}

    def __call__(
        self,
        out: torch.Tensor,  # [T, N] bf16 or fp32, contiguous, updated in place
        x: torch.Tensor,  # [T, K] bf16
        index: torch.Tensor,  # [T] int64, -1: no adapter
        a: torch.Tensor,  # [G, nR, K] bf16
        bt: torch.Tensor,  # [G, R, N] bf16
        splits: tuple[int, ...],  # columns of out per module
    ) -> None:
        t, k = x.shape
        assert out.is_contiguous() and out.dtype in (torch.bfloat16, torch.float32) and x.dtype == torch.bfloat16
        x = x.contiguous()
        h = torch.empty(t, a.shape[1], dtype=torch.float32)  # [T, nR]
        nbytes = t * (a[0].numel() + bt[0].numel()) * 2
        columns = self._splits.setdefault(splits, torch.tensor(splits, dtype=torch.int64))
        self._kernel(
            x.data_ptr(), t, k, index.data_ptr(), a.data_ptr(), a.shape[1], bt.data_ptr(), bt.shape[1], bt.shape[2],
            columns.data_ptr(), len(splits), out.data_ptr(), int(out.dtype == torch.float32), _threads(nbytes),
            h.data_ptr(),
        )
