"""Decode attention for GPUs straight from the paged KV cache, in Triton.

One program per (sequence, KV head, context partition) walks its partition's visible positions in
chunks of BLOCK_N: it reads their slots from the step's slot table, loads those K rows once for
all the query heads that share the KV head (grouped-query attention), and keeps an online softmax
in fp32, so no context is gathered, no K/V is repeated per query head and no score matrix is
materialised. With more than one partition a second kernel merges the partitions' partial
softmaxes (flash-decoding).

NOTE: partitions, because one program per (sequence, KV head) walking a whole 8K context in
series left an H200 mostly idle: 44 ms for 64 sequences x 8K, 27x the SDPA path it replaces
(benchmarks/gpu_check.py). The partition count follows the slot table's width alone, which is
fixed per CUDA-graph bucket, and loop bounds come from the device tensors `first`/`last`, so a
step never waits on the host and both kernels can be captured in a graph. Scores and P.V run on
tensor cores in the cache's dtype with fp32 accumulation (fp32 caches: IEEE fp32 dots, so the
fp32 engine still matches the CPU one token for token; under the interpreter every dot is fp32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.triton_support import interpreting


@triton.jit
def _partition_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, part_acc_ptr, part_ml_ptr, slots_ptr, first_ptr, last_ptr,
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
    PARTITION: tl.constexpr,  # context positions per program
    SPLIT: tl.constexpr,  # False: one partition, the result goes straight to out
    FP32_DOTS: tl.constexpr,  # fp32 IEEE dots: fp32 caches, and the interpreter (its bf16 dots are wrong)
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    n_parts = tl.num_programs(2)
    g = tl.arange(0, GROUP_PAD)  # [G]
    d = tl.arange(0, HEAD_DIM)  # [hd]
    heads = kvh * GROUP + g  # [G]
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=(g < GROUP)[:, None], other=0.0)  # [G, hd]
    lo = tl.maximum(tl.load(first_ptr + b), part * PARTITION)
    hi = tl.minimum(tl.load(last_ptr + b) + 1, (part + 1) * PARTITION)  # positions lo..hi-1; none if hi <= lo
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)  # running max
    l_sum = tl.zeros([GROUP_PAD], tl.float32)  # running denominator
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for pos0 in range(lo - lo % BLOCK_N, hi, BLOCK_N):
        pos = pos0 + tl.arange(0, BLOCK_N)  # [N]
        visible = (pos >= lo) & (pos < hi)  # [N]
        slot = tl.load(slots_ptr + b * stride_sb + pos, mask=visible, other=0).to(tl.int64)  # [N]
        k = tl.load(k_ptr + slot[:, None] * stride_ks + kvh * stride_kh + d[None, :],
                    mask=visible[:, None], other=0.0)  # [N, hd]
        if FP32_DOTS:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")  # [G, N]
        else:
            s = tl.dot(q, tl.trans(k))  # [G, N] fp32 accumulation
        s = tl.where(visible[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # [G]
        p = tl.exp(s - m_new[:, None])  # [G, N]
        alpha = tl.exp(m - m_new)  # [G]
        v = tl.load(v_ptr + slot[:, None] * stride_vs + kvh * stride_vh + d[None, :],
                    mask=visible[:, None], other=0.0)  # [N, hd]
        if FP32_DOTS:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")  # [G, hd]
        else:
            pv = tl.dot(p.to(v.dtype), v)  # [G, hd]
        acc = acc * alpha[:, None] + pv
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        m = m_new
    if SPLIT:  # unnormalised partials; an empty partition leaves m = -inf, l = 0, acc = 0
        row = (b * GROUP * tl.num_programs(1) + heads) * n_parts + part  # [G] index into [B, H, P]
        tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=(g < GROUP)[:, None])
        tl.store(part_ml_ptr + row * 2, m, mask=g < GROUP)
        tl.store(part_ml_ptr + row * 2 + 1, l_sum, mask=g < GROUP)
    else:
        out = acc / l_sum[:, None]  # [G, hd]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=(g < GROUP)[:, None])


@triton.jit
def _merge_kernel(
    out_ptr, part_acc_ptr, part_ml_ptr, stride_ob, stride_oh,
    N_PARTS: tl.constexpr, PARTS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    p = tl.arange(0, PARTS_PAD)  # [P]
    d = tl.arange(0, HEAD_DIM)  # [hd]
    row = (b * tl.num_programs(1) + h) * N_PARTS + p  # [P]
    m = tl.load(part_ml_ptr + row * 2, mask=p < N_PARTS, other=float("-inf"))  # [P]
    l_sum = tl.load(part_ml_ptr + row * 2 + 1, mask=p < N_PARTS, other=0.0)  # [P]
    acc = tl.load(part_acc_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=(p < N_PARTS)[:, None], other=0.0)
    weight = tl.exp(m - tl.max(m, axis=0))  # [P]; empty partitions: exp(-inf) = 0
    out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(l_sum * weight, axis=0)  # [hd]
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def paged_decode_attention(
    q: torch.Tensor,  # [B, H, hd]
    k_cache: torch.Tensor,  # [S, KVH, hd]
    v_cache: torch.Tensor,  # [S, KVH, hd]
    slots: torch.Tensor,  # [B, L] cache slot of each context position
    first: torch.Tensor,  # [B] first visible position (sliding window)
    last: torch.Tensor,  # [B] the query's own position (its K/V already written)
    block_n: int | None = None,
    partition: int | None = None,
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
    partition = partition or 512  # as vLLM's paged attention v2: enough programs to fill a GPU at 1 x 8K
    if partition % block_n:
        raise ValueError(f"partition ({partition}) must be a multiple of block_n ({block_n})")
    n_parts = triton.cdiv(slots.shape[1], partition)
    split = n_parts > 1
    part_acc = q.new_empty(batch, n_heads, n_parts, head_dim, dtype=torch.float32) if split else out  # [B, H, P, hd]
    part_ml = q.new_empty(batch, n_heads, n_parts, 2, dtype=torch.float32) if split else out  # [B, H, P, (max, sum)]
    _partition_kernel[(batch, n_kv, n_parts)](
        q, k_cache, v_cache, out, part_acc, part_ml, slots, first, last,
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
        PARTITION=partition,
        SPLIT=split,
        FP32_DOTS=k_cache.dtype == torch.float32 or interpreting(),
    )
    if split:
        _merge_kernel[(batch, n_heads)](
            out, part_acc, part_ml, out.stride(0), out.stride(1),
            N_PARTS=n_parts, PARTS_PAD=triton.next_power_of_2(n_parts), HEAD_DIM=head_dim,
        )
    return out
