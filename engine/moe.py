"""Mixture-of-experts routing and expert dispatch.

`fused_moe` is the one seam where expert computation happens: the PyTorch path below serves
CPUs, and a GPU kernel plugs in here with the same signature.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.linear import Linear


def select_experts(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral routing: softmax in fp32 over all experts, keep top-k, renormalise."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, k], [T, k]
    weights = weights / weights.sum(dim=-1, keepdim=True)  # [T, k]
    return weights, ids


@dataclass(frozen=True)
class Expert:
    """One expert's SwiGLU MLP: w2(silu(w1 x) * w3 x)."""

    gate_up: Linear  # w13 [2I, D]: w1 rows, then w3 rows
    down: Linear  # w2 [D, I]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # NOTE: w1 and w3 run as one matmul: a oneDNN call costs ~20 us before it reads a byte,
        # which is more than silu and the product cost at decode sizes (measured, 2-core CPU).
        h = self.gate_up(x)  # [n, 2I]
        inter = h.shape[1] // 2
        return self.down(F.silu(h[:, :inter]) * h[:, inter:])  # [n, D]


def make_experts(w13: torch.Tensor, w2: torch.Tensor) -> list[Expert]:
    """Per-expert MLPs over stacked weights w13 [E, 2I, D] (w1 rows, then w3 rows) and w2 [E, D, I]."""
    return [Expert(Linear(w13[e]), Linear(w2[e])) for e in range(w2.shape[0])]


def fused_moe(
    x: torch.Tensor,  # [T, D]
    experts: Sequence[Expert],
    topk_weights: torch.Tensor,  # [T, k] fp32
    topk_ids: torch.Tensor,  # [T, k]
) -> torch.Tensor:
    """sum_k weight_k * expert_k(x) for each token's k chosen experts.

    NOTE: tokens are grouped by expert (one stable sort) so each active expert runs one
    matmul over all of its tokens: efficient from batch 1 (two small matmuls) to thousands
    of tokens, with no per-token weight gathers and no loop over tokens.
    """
    num_tokens, top_k = topk_ids.shape
    if num_tokens == 1:
        # Batch-1 decode: nothing to group, the token's k experts run on it directly (the same
        # arithmetic as below, without the sort and the scatter back).
        outs = [experts[e](x) for e in topk_ids[0].tolist()]  # k x [1, D]
        unsorted = torch.cat(outs)  # [k, D]
    else:
        flat_ids = topk_ids.reshape(-1)  # [T*k]
        order = torch.argsort(flat_ids, stable=True)  # [T*k]
        counts = torch.bincount(flat_ids, minlength=len(experts)).tolist()
        xs = x.index_select(0, order // top_k)  # [T*k, D] each sorted slot's source token
        outs = []
        start = 0
        for expert, count in zip(experts, counts):
            if count:
                outs.append(expert(xs[start : start + count]))  # [n, D]
                start += count
        unsorted = torch.empty_like(xs)  # [T*k, D] back in (token, choice) order
        unsorted[order] = torch.cat(outs)
    # NOTE: the weighted sum over a token's k outputs is a reshape, not an index_add_: it is
    # deterministic, and index_add_ (scatter_add) is slow on CPU for these shapes.
    weighted = unsorted.view(num_tokens, top_k, -1) * topk_weights.to(x.dtype).unsqueeze(-1)  # [T, k, D]
    return weighted.sum(dim=1)  # [T, D]
