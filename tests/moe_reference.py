"""A plain fp32 loop over experts: the reference every MoE path is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.moe import select_experts
from engine.quant import quantize_act_fp8


def reference_moe(
    x: torch.Tensor,  # [T, D]
    w13: torch.Tensor,  # [E, 2I, D]
    w2: torch.Tensor,  # [E, D, I]
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k]
    quantize_acts: bool = False,
) -> torch.Tensor:
    """fp32 loop over experts; `quantize_acts` rounds each GEMM's input through per-token fp8."""

    def fp8_round(a: torch.Tensor) -> torch.Tensor:
        a8, scale = quantize_act_fp8(a)
        return a8.float() * scale

    xf = x.float()
    out = torch.zeros_like(xf)  # [T, D]
    inter = w2.shape[2]
    for e in range(w13.shape[0]):
        tok, slot = (topk_ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = fp8_round(xf[tok]) if quantize_acts else xf[tok]  # [n, D]
        h = xe @ w13[e].float().t()  # [n, 2I]
        act = F.silu(h[:, :inter]) * h[:, inter:]  # [n, I]
        act = fp8_round(act) if quantize_acts else act
        y = act @ w2[e].float().t()  # [n, D]
        out.index_add_(0, tok, y * topk_weights[tok, slot, None])
    return out


def moe_problem(
    num_tokens: int, num_experts: int, top_k: int, hidden: int, inter: int, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """x [T, D], w13 [E, 2I, D], w2 [E, D, I] (unit-variance outputs), routing weights and ids [T, k]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen)  # [T, D]
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) * hidden**-0.5  # [E, 2I, D]
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) * inter**-0.5  # [E, D, I]
    weights, ids = select_experts(torch.randn(num_tokens, num_experts, generator=gen), top_k)  # [T, k]
    return x, w13, w2, weights, ids


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute error relative to the reference's largest magnitude."""
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()
