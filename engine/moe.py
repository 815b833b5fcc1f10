"""Mixture-of-experts routing and expert dispatch.

`fused_moe` is the one seam where expert computation happens: the PyTorch path below serves
CPUs, and a GPU kernel plugs in here with the same signature.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from engine.linear import Linear


def select_experts(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral routing: softmax in fp32 over all experts, keep top-k, renormalise."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, k], [T, k]
    weights = weights / weights.sum(dim=-1, keepdim=True)  # [T, k]
    return weights, ids


def fused_moe(
    x: torch.Tensor,  # [T, D]
    gate_up: Sequence[Linear],  # per expert: W13 [2I, D], gate (w1) rows then up (w3) rows
    down: Sequence[Linear],  # per expert: W2 [D, I]
    topk_weights: torch.Tensor,  # [T, k] fp32
    topk_ids: torch.Tensor,  # [T, k]
) -> torch.Tensor:
    """sum_k weight_k * w2_e(silu(w1_e x) * w3_e x) for each token's k chosen experts.

    NOTE: tokens are grouped by expert (one stable sort) so each active expert runs one
    matmul over all of its tokens: efficient from batch 1 (two small matmuls) to thousands
    of tokens, with no per-token weight gathers and no loop over tokens.
    """
    num_tokens, top_k = topk_ids.shape
    inter = gate_up[0].out_features // 2
    # NOTE: the weighted sum over a token's k outputs is a reshape, not an index_add_: it is
    # deterministic, and index_add_ (scatter_add) is slow on CPU for these shapes.
    flat_ids = topk_ids.reshape(-1)  # [T*k]
    order = torch.argsort(flat_ids, stable=True)  # [T*k]
    counts = torch.bincount(flat_ids, minlength=len(gate_up)).tolist()
    token_of = order // top_k  # [T*k] source token of each sorted slot
    xs = x.index_select(0, token_of)  # [T*k, D]
    out = torch.empty_like(xs)  # [T*k, D]
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        end = start + count
        h = gate_up[expert](xs[start:end])  # [n, 2I]
        act = F.silu(h[:, :inter]) * h[:, inter:]  # [n, I]
        out[start:end] = down[expert](act)  # [n, D]
        start = end
    unsorted = torch.empty_like(out)  # [T*k, D] back in (token, choice) order
    unsorted[order] = out
    weighted = unsorted.view(num_tokens, top_k, -1) * topk_weights.to(x.dtype).unsqueeze(-1)  # [T, k, D]
    return weighted.sum(dim=1)  # [T, D]
