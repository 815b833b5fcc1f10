"""Fused mixture-of-experts for GPUs: tokens sorted by expert, one grouped Triton GEMM per projection.

`fused_moe_triton` computes what `engine.moe.fused_moe` does, over the stacked weights `w13 [E, 2I, D]`
and `w2 [E, D, I]`, with optional fp8 scales:

1. `moe_align_block_size` sorts the T*k (token, slot) pairs by expert and pads every expert's
   run to a multiple of BLOCK_M, so each BLOCK_M row-tile of the sorted order belongs to one expert;
2. the grouped GEMM multiplies each tile by its expert's weight: `x @ w13[e].T` -> [T*k, 2I];
3. silu(gate) * up in PyTorch -> [T*k, I];
4. the same kernel with `w2`, multiplying each row by its routing weight -> [T*k, D];
5. a sum over the k slots -> [T, D].

fp8: weights `float8_e4m3fn` with fp32 scales per expert `[E]` or per output channel `[E, N]`;
activations are quantised per token (dynamic) or with a static scale, the dot runs fp8 x fp8 with
fp32 accumulation and both scales are applied once, after the K loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from engine.quant import FP8, quantize_act_fp8
from engine.triton_support import has_fp8_tensor_cores, interpreting

if TYPE_CHECKING:
    from engine.lora_weights import ExpertLoRA

# (largest batch of tokens, tile config), for 16-bit dots and for fp8 x fp8 dots (w8a8; w8a16 turns
# its fp8 weight tiles into 16-bit ones and takes the 16-bit tiles). NOTE: small batches touch few
# rows per expert, so they take short, wide tiles (BLOCK_M 16) and stream weights; large batches
# take square tiles and group GROUP_M row tiles per weight column tile so that tile is reused from
# L2. fp8 tiles take twice the BLOCK_K: the same bytes per pipeline stage. Tuned on one
# H200 at 8x7B's shapes (`benchmarks/fused_moe_kernel.py gpu --sweep`, whole calls replayed from
# CUDA graphs): against the first, untuned table, 64 tokens 0.81 -> 0.74 ms bf16 and 0.53 -> 0.49
# ms fp8, 256 tokens 1.02 -> 0.93 and 0.92 -> 0.67, 2,048 tokens 4.20 -> 3.55 and 3.14 -> 2.95; up
# to 16 tokens no tile in the sweep beat the first table's by more than 5%. `config=` overrides.
_SMALL = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
_TILES_16BIT: list[tuple[int, dict[str, int]]] = [
    (16, _SMALL),
    (64, dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=3)),
    (256, dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)),
    (1 << 62, dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)),
]
_TILES_FP8: list[tuple[int, dict[str, int]]] = [
    (16, _SMALL),
    (64, dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=256, GROUP_M=1, num_warps=4, num_stages=3)),
    (256, dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)),
    (1 << 62, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)),
]


# Shared memory a tile's pipeline may take: A100's 164 KiB and Hopper's 227 KiB per block, less
# room for the epilogue.
SMEM_BUDGET = 160 * 1024
# Rows of the [T*k, I] activation computed at once: bounds its fp32 temporaries (~3 x rows x I x 4
# bytes) to ~700 MB at Mixtral-8x22B's I = 16384, whatever the batch.
_ACT_ROWS = 4096


def tile_config(num_tokens: int, fp8_dots: bool = False) -> dict[str, int]:
    """The tile sizes for a batch of `num_tokens` tokens (first bucket that holds it)."""
    return next(dict(cfg) for limit, cfg in (_TILES_FP8 if fp8_dots else _TILES_16BIT) if num_tokens <= limit)


def pipeline_stages(cfg: dict[str, int], a_bytes: int, b_bytes: int) -> int:
    """`cfg`'s stages, fewer where its A and B tiles (as loaded) would overflow SMEM_BUDGET.

    NOTE: each stage holds one [BM, BK] tile of A and one [BK, BN] tile of B; fp32 activations
    (fp32 engines) double A's share, and 128x128x64 with 4 stages would need 256 KiB.
    """
    per_stage = cfg["BLOCK_K"] * (cfg["BLOCK_M"] * a_bytes + cfg["BLOCK_N"] * b_bytes)
    return max(1, min(cfg["num_stages"], SMEM_BUDGET // per_stage))


def moe_align_block_size(
    topk_ids: torch.Tensor,  # [T, k]
    block_m: int,
    num_experts: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort (token, slot) pairs by expert, each expert's run padded to a multiple of `block_m`.

    Returns
      sorted_ids [P] int32: flat pair index t*k + j in expert order; padding slots hold T*k;
      expert_ids [P / block_m] int32: the expert of each row tile;
      num_padded [1] int32: how many entries of sorted_ids are in use (the rest are never read).
    NOTE: P is the worst case T*k + E*(block_m - 1) so nothing here waits for the GPU (no .item()):
    tiles past `num_padded` exit at once in the kernel. Counts come from scatter_add_, not bincount,
    whose CUDA version reads min/max back to the host (illegal inside a CUDA-graph capture).
    """
    num_pairs = topk_ids.numel()
    flat = topk_ids.reshape(-1).to(torch.int64)  # [T*k]
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat))  # [E]
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    padded_end = torch.cumsum(padded, 0)  # [E]
    padded_start = padded_end - padded  # [E]
    run_start = torch.cumsum(counts, 0) - counts  # [E] first sorted position of each expert
    order = torch.argsort(flat, stable=True)  # [T*k] pairs in expert order
    expert_of = flat[order]  # [T*k]
    rank = torch.arange(num_pairs, device=flat.device) - run_start[expert_of]  # [T*k] position in its run
    max_padded = (num_pairs + num_experts * (block_m - 1) + block_m - 1) // block_m * block_m
    sorted_ids = torch.full((max_padded,), num_pairs, dtype=torch.int32, device=flat.device)  # [P]
    sorted_ids[padded_start[expert_of] + rank] = order.to(torch.int32)
    tile_start = torch.arange(0, max_padded, block_m, device=flat.device)  # [P / block_m]
    # Tiles past the last expert get E; they are never used (see num_padded).
    expert_ids = torch.searchsorted(padded_end, tile_start, right=True).to(torch.int32)  # [P / block_m]
    return sorted_ids, expert_ids, padded_end[-1:].to(torch.int32)


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, b_ptr, c_ptr,
    a_scale_ptr, b_scale_ptr, topk_weights_ptr,
    sorted_ids_ptr, expert_ids_ptr, num_padded_ptr,
    N, K, max_padded, num_pairs,
    stride_am, stride_ak,
    stride_be, stride_bn, stride_bk,
    stride_cm, stride_cn,
    stride_asm,
    stride_bse, stride_bsn,
    A_ROW_DIV: tl.constexpr,  # pair -> row of A: top_k when A is x [T, D], 1 when A is [T*k, I]
    A_SCALED: tl.constexpr,  # fp8 activations: per-row scale after the K loop
    B_SCALED: tl.constexpr,  # fp8 weights: per-expert / per-channel scale after the K loop
    B_TO_A_DTYPE: tl.constexpr,  # fp8 weights with 16/32-bit activations: convert the weight tile
    UPCAST_FP32: tl.constexpr,  # interpreter: dot 16-bit operands in fp32 (see _grouped_gemm)
    INPUT_PRECISION: tl.constexpr,
    MUL_ROUTED_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C[pair] = A[pair // A_ROW_DIV] @ B[expert(pair)].T (scaled), for the pairs in sorted order."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(max_padded, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M consecutive row tiles sweep the same column tiles, which then
    # stay in L2 while they are reused.
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)  # [BM] (sorted_ids has a multiple of BLOCK_M entries)
    row_mask = pair < num_pairs
    a_row = pair // A_ROW_DIV
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_row[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak  # [BM, BK]
    b_ptrs = b_ptr + expert * stride_be + offs_k[:, None] * stride_bk + offs_n[None, :].to(tl.int64) * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - k0 * BLOCK_K
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # [BM, BK]
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)  # [BK, BN]
        if UPCAST_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        elif B_TO_A_DTYPE:
            b = b.to(a.dtype)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if A_SCALED:
        a_scale = tl.load(a_scale_ptr + a_row * stride_asm, mask=row_mask, other=0.0)  # [BM]
        acc = acc * a_scale[:, None]
    if B_SCALED:
        b_scale = tl.load(b_scale_ptr + expert * stride_bse + offs_n * stride_bsn, mask=n_mask, other=0.0)  # [BN]
        acc = acc * b_scale[None, :]
    if MUL_ROUTED_WEIGHT:
        weight = tl.load(topk_weights_ptr + pair, mask=row_mask, other=0.0)  # [BM]
        acc = acc * weight[:, None]
    c_ptrs = c_ptr + pair[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


def _expert_scale(scale: torch.Tensor, num_experts: int, n: int) -> torch.Tensor:
    """[] / [E] / [E, N] weight scale as an [E, N] fp32 view (stride 0 where it is shared)."""
    if scale.ndim == 2:
        return scale.float()
    return scale.float().reshape(-1, 1).expand(num_experts, n)


def _grouped_gemm(
    a: torch.Tensor,  # [rows, K]
    b: torch.Tensor,  # [E, N, K]
    c: torch.Tensor,  # [T*k, N]
    a_scale: torch.Tensor | None,  # [rows, 1]
    b_scale: torch.Tensor | None,  # [], [E] or [E, N]
    topk_weights: torch.Tensor | None,  # [T*k] fp32
    routing: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    a_row_div: int,
    cfg: dict[str, int],
) -> None:
    sorted_ids, expert_ids, num_padded = routing
    num_experts, n, k = b.shape
    b_scale_en = _expert_scale(b_scale, num_experts, n) if b_scale is not None else None
    # NOTE: the interpreter holds bf16 as raw uint16 (its tl.dot is wrong) and runs fp16 dots in
    # numpy without BLAS, so there every dot except fp32 x fp32 and fp8 x fp8 runs in fp32: the
    # same products (exact in fp32) and the same fp32 accumulation as the GPU.
    upcast = interpreting() and not (a.dtype == b.dtype and a.dtype in (torch.float32, FP8))
    # fp32 activations get IEEE fp32 dots (as torch.matmul), not TF32.
    precision = "ieee" if upcast or a.dtype == torch.float32 else "tf32"
    tiles = {name: cfg[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
    grid = (triton.cdiv(sorted_ids.numel(), cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    dummy = c  # pointer for arguments a constexpr flag switches off
    _grouped_gemm_kernel[grid](
        a, b, c,
        a_scale if a_scale is not None else dummy,
        b_scale_en if b_scale_en is not None else dummy,
        topk_weights if topk_weights is not None else dummy,
        sorted_ids, expert_ids, num_padded,
        n, k, sorted_ids.numel(), c.shape[0],
        a.stride(0), a.stride(1),
        b.stride(0), b.stride(1), b.stride(2),
        c.stride(0), c.stride(1),
        a_scale.stride(0) if a_scale is not None else 0,
        b_scale_en.stride(0) if b_scale_en is not None else 0,
        b_scale_en.stride(1) if b_scale_en is not None else 0,
        A_ROW_DIV=a_row_div,
        A_SCALED=a_scale is not None,
        B_SCALED=b_scale is not None,
        B_TO_A_DTYPE=b.dtype != a.dtype,
        UPCAST_FP32=upcast,
        INPUT_PRECISION=precision,
        MUL_ROUTED_WEIGHT=topk_weights is not None,
        num_warps=cfg["num_warps"],
        num_stages=pipeline_stages(cfg, a.element_size(), b.element_size()),
        **tiles,
    )


def _silu_and_mul(
    h: torch.Tensor,  # [R, 2I] gate rows' outputs, then up rows' outputs
    static_scale: torch.Tensor | None,
    quantize: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """silu(gate) * up in fp32, then fp8 per row (or the static scale) or h's dtype -> [R, I], [R, 1] | None.

    Row blocks of _ACT_ROWS keep the fp32 temporaries bounded; every step is row-local, so the
    result is the same as in one piece.
    """
    rows, inter = h.shape[0], h.shape[1] // 2
    out = torch.empty(rows, inter, dtype=FP8 if quantize else h.dtype, device=h.device)  # [R, I]
    scales = torch.empty(rows, 1, dtype=torch.float32, device=h.device) if quantize else None  # [R, 1]
    for start in range(0, rows, _ACT_ROWS):
        part = h[start : start + _ACT_ROWS]
        act = F.silu(part[:, :inter].float()) * part[:, inter:].float()  # [r, I] fp32
        if not quantize:
            out[start : start + _ACT_ROWS] = act
            continue
        act8, scale = quantize_act_fp8(act, static_scale)  # [r, I] fp8, [r, 1] (or the static scalar)
        out[start : start + _ACT_ROWS] = act8
        if scales is not None:
            scales[start : start + _ACT_ROWS] = scale
    return out, scales


def fused_moe_triton(
    x: torch.Tensor,  # [T, D] fp32 / fp16 / bf16
    w13: torch.Tensor,  # [E, 2I, D]  gate (w1) rows, then up (w3) rows; fp8 when w13_scale is given
    w2: torch.Tensor,  # [E, D, I]
    topk_weights: torch.Tensor,  # [T, k] fp32
    topk_ids: torch.Tensor,  # [T, k]
    w13_scale: torch.Tensor | None = None,  # [], [E] or [E, 2I] fp32
    w2_scale: torch.Tensor | None = None,  # [], [E] or [E, D] fp32
    a13_scale: torch.Tensor | None = None,  # static activation scale (scalar); None: dynamic per token
    a2_scale: torch.Tensor | None = None,
    quantize_activations: bool | None = None,
    config: dict[str, int] | None = None,
    lora: "ExpertLoRA | None" = None,
) -> torch.Tensor:
    """sum_k weight_k * w2_e(silu(w1_e x) * w3_e x) for each token's k chosen experts -> [T, D] in x's dtype.
    `lora`: each pair's adapter added to w1/w3 before the activation and to w2 (engine/lora_weights.py).

    fp8 weights (scales given): with `quantize_activations` (w8a8) activations are quantised per
    token, or with the static scales, and the dots run on fp8 tensor cores; without it (w8a16) the
    kernel converts weight tiles to x's dtype and fp8 saves memory and bandwidth only.
    None picks w8a8 where the GPU has fp8 tensor cores (Ada, Hopper and later).
    """
    num_tokens, top_k = topk_ids.shape
    num_experts, two_inter, _ = w13.shape
    if (w13_scale is None) != (w2_scale is None):
        raise ValueError("give both w13_scale and w2_scale (fp8 weights) or neither")
    if quantize_activations is None:
        quantize_activations = has_fp8_tensor_cores(x.device)
    fp8_acts = w13_scale is not None and quantize_activations
    cfg = config or tile_config(num_tokens, fp8_dots=fp8_acts)
    routing = moe_align_block_size(topk_ids, cfg["BLOCK_M"], num_experts)
    pairs_weight = topk_weights.reshape(-1).float()  # [T*k]

    a1, a1_scale = quantize_act_fp8(x, a13_scale) if fp8_acts else (x, None)  # [T, D], [T, 1]
    h = torch.empty(num_tokens * top_k, two_inter, dtype=x.dtype, device=x.device)  # [T*k, 2I]
    _grouped_gemm(a1, w13, h, a1_scale, w13_scale, None, routing, top_k, cfg)
    groups = None if lora is None else lora.groups()
    if lora is not None:
        lora.add13(h, x.repeat_interleave(top_k, dim=0), groups)
    a2, a2_row_scale = _silu_and_mul(h, a2_scale if fp8_acts else None, fp8_acts)  # [T*k, I], [T*k, 1]
    out = torch.empty(num_tokens * top_k, w2.shape[1], dtype=x.dtype, device=x.device)  # [T*k, D]
    _grouped_gemm(a2, w2, out, a2_row_scale, w2_scale, pairs_weight, routing, 1, cfg)
    if lora is not None:
        # The adapter reads the activation unquantised (a2 may be fp8); its product is weighted as
        # the kernel weighted the expert's.
        inter = two_inter // 2
        act = (F.silu(h[:, :inter].float()) * h[:, inter:].float()).to(x.dtype)  # [T*k, I]
        extra = torch.zeros_like(out)  # [T*k, D]
        lora.add2(extra, act, groups)
        out += extra * pairs_weight.unsqueeze(-1).to(out.dtype)
    return out.view(num_tokens, top_k, -1).sum(dim=1)  # [T, D]
