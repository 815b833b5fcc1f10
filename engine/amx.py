"""CPU kernels on Intel AMX tiles (engine/amx_kernels.c), built on first use: the whole expert
block of a layer in one call (`AmxExperts`) and dense projections (`AmxLinear`).

The kernel is plain C with no Python or torch headers, so building it takes about a second with
the system's gcc; it is loaded with ctypes, which releases the GIL for the call. It links the
OpenMP runtime torch already loaded (same soname), so both share one thread pool.

Measured on the 2-core AMX box, bench shapes (8 experts, D 1024, I 3584), per layer against the
oneDNN per-expert path (`engine.moe.fused_moe`): 16 tokens 7.6 vs 10.0 ms (23 vs 18 GB/s of
weights), 1 token 1.9 vs 2.6 ms, 1,024 tokens 31 vs 55 ms (`benchmarks/fused_moe_kernel.py cpu-amx`).
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

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("amx_kernels.c")
_COMPILE = ["-O3", "-ffast-math", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mamx-tile",
            "-mamx-bf16"]
# NOTE: -ffast-math only when compiling (it lets gcc call glibc's vector expf). Given to the link
# step, gcc adds crtfastmath.o, which switches the whole process to flush-to-zero on load.
_LINK = ["-shared", "-fopenmp", "-lm"]
_CPU_FLAGS = {"amx_tile", "amx_bf16", "avx512f", "avx512bw"}
# Rows of one AMX tile: each expert's rows are padded to a multiple of it (amx_kernels.c).
TILE_ROWS = 16


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mixtral-serve"


def _cpu_has_amx() -> bool:
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return _CPU_FLAGS <= set(line.split(":", 1)[1].split())
    return False


def _build() -> Path:
    """The compiled kernel, cached by a hash of its source and flags."""
    digest = hashlib.sha256(_SOURCE.read_bytes() + " ".join(_COMPILE + _LINK).encode()).hexdigest()[:16]
    lib = _cache_dir() / f"amx_kernels-{digest}.so"
    if lib.exists():
        return lib
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("no C compiler (gcc) on PATH")
    lib.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target, then rename: processes starting together never load a partial file.
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        obj, out = Path(tmp) / "amx_kernels.o", Path(tmp) / lib.name
        try:
            for cmd in ([compiler, *_COMPILE, "-c", str(_SOURCE), "-o", str(obj)], [compiler, str(obj), "-o", str(out), *_LINK]):
                subprocess.run(cmd, check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"building {_SOURCE.name} failed:\n{e.stderr}") from e
        os.replace(out, lib)
    return lib


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The loaded kernel, or None where it cannot run (no AMX, no compiler): the caller falls back."""
    if not _cpu_has_amx():
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, RuntimeError) as e:
        log.warning("AMX kernels unavailable, using oneDNN matmuls: %s", e)
        return None
    if lib.amx_moe_init() != 0:
        log.warning("the kernel refused AMX tile data (arch_prctl); using oneDNN matmuls")
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.amx_moe_forward.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr]
    lib.amx_moe_forward.restype = None
    lib.amx_linear.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, i64, ptr]
    lib.amx_linear.restype = None
    lib.add_rms_norm.argtypes = [ptr, ptr, ptr, ctypes.c_float, i64, i64, i64, ptr]
    lib.add_rms_norm.restype = None
    lib.decode_attention.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, ptr, ptr]
    lib.decode_attention.restype = None
    return lib


def supports(dtype: torch.dtype, hidden: int, intermediate: int) -> bool:
    """Whether the expert kernel runs here for bf16 experts of this (per-rank) shape."""
    return dtype == torch.bfloat16 and hidden % 64 == 0 and intermediate % 32 == 0 and _library() is not None


def supports_linear(weight: torch.Tensor) -> bool:
    """Whether `AmxLinear` runs here for this weight [N, K]."""
    n, k = weight.shape
    return weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and n % 64 == 0 and k % 32 == 0 \
        and _library() is not None


def pack_w13(w13: torch.Tensor) -> torch.Tensor:
    """w13 [E, 2I, D] (w1 rows, then w3 rows) as AMX B tiles: [E, I/32, D/32, 2 (w1, w3), 2, 16, 16, 2].

    Panel p holds w1 and w3 output columns [32p, 32p + 32); each tile is 16 K-pairs x 16 columns
    x the pair, so (r, c, j) is W[col c][k 2r + j] of its 32-wide K chunk.
    """
    e, two_i, d = w13.shape
    w = w13.view(e, 2, two_i // 64, 2, 16, d // 32, 16, 2)  # [E, w1|w3, p, half, col, kc, r, j]
    return w.permute(0, 2, 5, 1, 3, 6, 4, 7).contiguous()


def pack_panels(w: torch.Tensor) -> torch.Tensor:
    """W [..., N, K] as AMX B tiles [..., N/64, K/32, 4, 16, 16, 2]: panel p holds output columns
    [64p, 64p + 64) as 4 tiles of 16 columns (for w2 [E, D, I] and dense weights [N, K])."""
    *lead, n, k = w.shape
    v = w.reshape(-1, n // 64, 4, 16, k // 32, 16, 2)  # [B, p, sub, col, kc, r, j]
    return v.permute(0, 1, 4, 2, 5, 3, 6).reshape(*lead, n // 64, k // 32, 4, 16, 16, 2).contiguous()


class AmxExperts:
    """Every expert of one layer (this rank's slice), packed for the kernel."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor) -> None:
        lib = _library()
        assert lib is not None and supports(w13.dtype, w2.shape[1], w2.shape[2]), "check amx.supports first"
        self._forward = lib.amx_moe_forward
        self.num_experts, self.hidden, self.intermediate = w2.shape
        self.w13 = pack_w13(w13)
        self.w2 = pack_panels(w2)

    def __call__(
        self,
        x: torch.Tensor,  # [T, D] bf16
        topk_weights: torch.Tensor,  # [T, k] fp32
        topk_ids: torch.Tensor,  # [T, k]
    ) -> torch.Tensor:
        """sum_k weight_k * expert_k(x) for each token, [T, D] bf16."""
        t, k = topk_ids.shape
        d, i, e = self.hidden, self.intermediate, self.num_experts
        rows = t * k + e * (TILE_ROWS - 1)  # every expert's rows padded to whole tiles
        x = x.contiguous()
        ids = topk_ids.to(torch.int64).contiguous()  # [T, k]
        weights = topk_weights.to(torch.float32).contiguous()  # [T, k]
        out = torch.empty(t, d, dtype=torch.bfloat16)  # [T, D]
        xs = torch.empty(rows, d, dtype=torch.bfloat16)  # [R, D] tokens grouped by expert
        act = torch.empty(rows, i, dtype=torch.bfloat16)  # [R, I] silu(x w1) * (x w3)
        y = torch.empty(rows, d, dtype=torch.float32)  # [R, D] second matmul, fp32
        slot_of = torch.empty(t * k, dtype=torch.int32)  # [T k] row of each (token, choice)
        self._forward(
            x.data_ptr(), ids.data_ptr(), weights.data_ptr(), t, k, e, d, i, torch.get_num_threads(),
            self.w13.data_ptr(), self.w2.data_ptr(), out.data_ptr(), xs.data_ptr(), act.data_ptr(),
            y.data_ptr(), slot_of.data_ptr(),
        )
        return out


class AmxLinear:
    """y = x @ W.T for one bf16 weight W [N, K], packed for the kernel."""

    def __init__(self, weight: torch.Tensor) -> None:
        lib = _library()
        assert lib is not None and supports_linear(weight), "check amx.supports_linear first"
        self._linear = lib.amx_linear
        self.out_features, self.in_features = weight.shape
        self.packed = pack_panels(weight)

    def __call__(self, x: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """x [M, K] bf16 -> [M, N] in `out_dtype` (bf16, or fp32 straight from the accumulators)."""
        m, k = x.shape
        x = x.contiguous()
        out = torch.empty(m, self.out_features, dtype=out_dtype)  # [M, N]
        xs = torch.empty(-(-m // TILE_ROWS) * TILE_ROWS, k, dtype=torch.bfloat16)  # [M padded, K]
        self._linear(
            x.data_ptr(), m, k, self.out_features, torch.get_num_threads(), self.packed.data_ptr(),
            out.data_ptr(), out_dtype == torch.float32, xs.data_ptr(),
        )
        return out


class AddRMSNorm:
    """RMSNorm over bf16 rows, optionally after the residual add that precedes it, in one pass.

    NOTE: an eager bf16 `F.rms_norm` on CPU is about eight ops (upcast, square, mean, rsqrt, ...),
    each a pass over the rows; with the add before it, that is ~200 us a call at 64 rows.
    """

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        lib = _library()
        assert lib is not None and weight.dtype == torch.bfloat16, "bf16 weights on an AMX CPU only"
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
        self._kernel(h.data_ptr(), delta_ptr, self.weight.data_ptr(), self.eps, t, d, torch.get_num_threads(),
                     normed.data_ptr())
        return normed


def supports_norm(weight: torch.Tensor) -> bool:
    return weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and _library() is not None


class DecodeAttention:
    """Attention of one query token per sequence over its paged bf16 K/V, read in place.

    NOTE: the PyTorch path gathers every sequence's context into [B, KVH, L, hd] copies of K and V
    before SDPA; at 64 sequences that gather and SDPA take ~8 ms of a ~100 ms step here.
    """

    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int) -> None:
        lib = _library()
        assert lib is not None, "an AMX CPU only"
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
        threads = torch.get_num_threads()
        q, slots = q.contiguous(), slots.contiguous()
        group = self.n_heads // self.n_kv_heads
        scores = torch.empty(threads, group, length, dtype=torch.float32)  # [threads, G, L]
        out = torch.empty(b, self.n_heads, self.head_dim, dtype=torch.bfloat16)  # [B, H, hd]
        self._kernel(
            q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(), first.data_ptr(), last.data_ptr(),
            b, self.n_heads, self.n_kv_heads, self.head_dim, length, threads, scores.data_ptr(), out.data_ptr(),
        )
        return out


def supports_attention(dtype: torch.dtype, device: torch.device) -> bool:
    return dtype == torch.bfloat16 and device.type == "cpu" and _library() is not None
