"""Decode attention for GPUs straight from the paged KV cache, in Triton.

One program per (sequence, KV head) walks the sequence's visible positions in chunks of BLOCK_N:
it reads their slots from the step's slot table, loads those K rows once for all the query heads
that share the KV head (grouped-query attention), and keeps an online softmax in fp32, so no
context is gathered, no K/V is repeated per query head and no score matrix is materialised.

NOTE: it replaces SDPA with a boolean mask over gathered contexts, which PyTorch can only run on
its math backend (fp32 upcast, K/V repeated to every head: gigabytes per layer at 64 sequences x
8K context). Loop bounds come from the device tensors `first`/`last`, so a step never waits on
the host and the kernel can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.triton_support import interpreting


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, slots_ptr, first_ptr, last_ptr,
    stride_qb, stride_qh,
    stride_ks, stride_kh,
    stride_vs, stride_vh,
    stride_ob, stride_oh,
    stride_sb,
    scale,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,  # GROUP rounded up to a power of two (at least 16 for tl.dot)
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    g = tl.arange(0, GROUP_PAD)  # [G]
    d = tl.arange(0, HEAD_DIM)  # [hd]
    heads = kvh * GROUP + g  # [G]
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=(g < GROUP)[:, None], other=0.0).to(tl.float32)  # [G, hd]
    first = tl.load(first_ptr + b)
    last = tl.load(last_ptr + b)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)  # running max
    l_sum = tl.zeros([GROUP_PAD], tl.float32)  # running denominator
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    start = first - first % BLOCK_N
    for pos0 in range(start, last + 1, BLOCK_N):
        pos = pos0 + tl.arange(0, BLOCK_N)  # [N]
        visible = (pos >= first) & (pos <= last)  # [N]
        slot = tl.load(slots_ptr + b * stride_sb + pos, mask=visible, other=0).to(tl.int64)  # [N]
        k = tl.load(k_ptr + slot[:, None] * stride_ks + kvh * stride_kh + d[None, :],
                    mask=visible[:, None], other=0.0).to(tl.float32)  # [N, hd]
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [G, N]
        s = tl.where(visible[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # [G]
        p = tl.exp(s - m_new[:, None])  # [G, N]
        alpha = tl.exp(m - m_new)  # [G]
        v = tl.load(v_ptr + slot[:, None] * stride_vs + kvh * stride_vh + d[None, :],
                    mask=visible[:, None], other=0.0).to(tl.float32)  # [N, hd]
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")  # [G, hd]
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        m = m_new
    out = acc / l_sum[:, None]  # [G, hd]
    tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(g < GROUP)[:, None])


def paged_decode_attention(
    q: torch.Tensor,  # [B, H, hd]
    k_cache: torch.Tensor,  # [S, KVH, hd]
    v_cache: torch.Tensor,  # [S, KVH, hd]
    slots: torch.Tensor,  # [B, L] cache slot of each context position
    first: torch.Tensor,  # [B] first visible position (sliding window)
    last: torch.Tensor,  # [B] the query's own position (its K/V already written)
    block_n: int | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v over positions first..last of each row -> [B, H, hd] (q's dtype)."""
    batch, n_heads, head_dim = q.shape
    n_kv = k_cache.shape[1]
    if n_heads % n_kv or head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"{n_heads} query heads over {n_kv} KV heads, head_dim {head_dim}: "
                         "heads must group evenly and head_dim be a power of two >= 16")
    group = n_heads // n_kv
    out = torch.empty_like(q)  # [B, H, hd]
    if batch == 0:
        return out
    # NOTE: small chunks under the interpreter (each program step is numpy); 64 positions on GPUs.
    block_n = block_n or (16 if interpreting() else 64)
    _decode_kernel[(batch, n_kv)](
        q, k_cache, v_cache, out, slots, first, last,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1),
        out.stride(0), out.stride(1),
        slots.stride(0),
        head_dim ** -0.5,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_N=block_n,
    )
    return out
