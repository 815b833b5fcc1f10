"""LoRA for batches of mixed adapters on GPUs: a shrink and an expand kernel, each row reading its
own adapter's weights (punica's BGMV), so one launch pair serves every adapter in the batch.

Same contract as `engine.lora_ops.add_lora_reference`; rows of group -1 cost one load and return.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, h_ptr, index_ptr, K, NR, stride_x, stride_ag, stride_an, stride_h,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    group = tl.load(index_ptr + row)
    if group >= 0:
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            xv = tl.load(x_ptr + row * stride_x + k, mask=k < K, other=0.0).to(tl.float32)  # [BK]
            av = tl.load(a_ptr + group * stride_ag + n[:, None] * stride_an + k[None, :],
                         mask=(n[:, None] < NR) & (k[None, :] < K), other=0.0).to(tl.float32)  # [BN, BK]
            acc += tl.sum(av * xv[None, :], axis=1)
        tl.store(h_ptr + row * stride_h + n, acc, mask=n < NR)


@triton.jit
def _expand_kernel(h_ptr, b_ptr, out_ptr, index_ptr, R, ROWS, row0, col0, stride_h, stride_bg, stride_br,
                   stride_out, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    row = tl.program_id(0)
    group = tl.load(index_ptr + row)
    if group >= 0:
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        r = tl.arange(0, BLOCK_R)
        hv = tl.load(h_ptr + row * stride_h + col0 + r, mask=r < R, other=0.0)  # [BR] fp32
        bv = tl.load(b_ptr + group * stride_bg + (row0 + n)[:, None] + r[None, :] * stride_br,
                     mask=(n[:, None] < ROWS) & (r[None, :] < R), other=0.0).to(tl.float32)  # [BN, BR]
        delta = tl.sum(bv * hv[None, :], axis=1)  # [BN]
        ptrs = out_ptr + row * stride_out + row0 + n
        old = tl.load(ptrs, mask=n < ROWS, other=0.0).to(tl.float32)
        tl.store(ptrs, (old + delta).to(out_ptr.dtype.element_ty), mask=n < ROWS)


def add_lora_triton(
    out: torch.Tensor,  # [T, N]
    x: torch.Tensor,  # [T, K]
    index: torch.Tensor,  # [T] int64 group per row, -1 none
    a: torch.Tensor,  # [G, n R, K]
    b: torch.Tensor,  # [G, R, N]
    splits: tuple[int, ...],
    block_n: int = 64,
    block_k: int = 128,
) -> None:
    rows, k = x.shape
    if rows == 0:
        return
    nr, rank = a.shape[1], b.shape[1]
    x, a, b = x.contiguous(), a.contiguous(), b.contiguous()
    h = torch.empty(rows, nr, dtype=torch.float32, device=x.device)  # [T, n R] (rows of group -1 unread)
    _shrink_kernel[(rows, triton.cdiv(nr, block_n))](
        x, a, h, index, k, nr, x.stride(0), a.stride(0), a.stride(1), h.stride(0), BLOCK_N=block_n, BLOCK_K=block_k
    )
    start = 0
    for j, size in enumerate(splits):
        _expand_kernel[(rows, triton.cdiv(size, block_n))](
            h, b, out, index, rank, size, start, j * rank, h.stride(0), b.stride(0), b.stride(1), out.stride(0),
            BLOCK_N=block_n, BLOCK_R=triton.next_power_of_2(rank),
        )
        start += size
