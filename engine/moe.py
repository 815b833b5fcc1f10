"""Mixture-of-experts routing and expert dispatch.

`fused_moe` is the PyTorch path over per-expert `Linear`s (any CPU); `engine.model.MoE` calls
the project's CPU kernel (`engine.cpu_kernels`, AMX or AVX512-BF16) on CPUs that run it and the
Triton kernel (`engine.fused_moe_triton`) on GPUs instead.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from engine import cpu_kernels
from engine.linear import Linear
from engine.model_config import ModelConfig
from engine.parallel import LocalShape, TPGroup

if TYPE_CHECKING:
    from engine.lora_weights import ExpertLoRA


MoEBackend = Literal["torch", "triton", "cpu"]


def resolve_moe_backend(
    choice: Literal["auto", "torch", "triton", "cpu"], device: torch.device, isa: cpu_kernels.Isa | None,
    cfg: ModelConfig, tp_size: int,
) -> MoEBackend:
    """The expert backend for `choice` ("auto": triton on GPUs, the project's CPU kernel where
    its instruction set `isa` was resolved and every per-rank shape fits it, else torch).

    NOTE: "cpu" asks the attention projections to fit the kernel too, so fp8 weights, which stay
    fp8 on this backend, never fall to PyTorch's slow CPU fp8 matmul.
    """
    d, hd = cfg.hidden_size, cfg.head_dim
    local = LocalShape.of(cfg, TPGroup(world_size=tp_size))
    kernel_runs = isa is not None and cpu_kernels.fits_experts(d, local.intermediate) and all(
        cpu_kernels.fits_linear(n, k) for n, k in [((local.n_heads + 2 * local.n_kv_heads) * hd, d), (d, local.n_heads * hd)]
    )
    if choice == "auto":
        return "triton" if device.type == "cuda" else "cpu" if kernel_runs else "torch"
    if choice == "cpu" and not kernel_runs:
        raise ValueError(
            "moe_backend 'cpu' needs the CPU kernels (cpu_kernels 'auto', 'amx' or 'avx512' on a CPU that "
            "runs them, bf16), a hidden size and per-rank q/k/v sizes that are multiples of 64, and a "
            "per-rank intermediate size that is a multiple of 32"
        )
    return choice


def select_experts(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral routing: softmax in fp32 over all experts, keep top-k, renormalise."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, k], [T, k]
    weights = weights / weights.sum(dim=-1, keepdim=True)  # [T, k]
    return weights, ids


@dataclass(frozen=True)
class Expert:
    """One expert's SwiGLU MLP, w2(silu(w1 x) * w3 x), as two matmuls.

    NOTE: w1 and w3 run as one matmul: a oneDNN call costs ~20 us before it reads a byte, more
    than silu and the product cost at decode sizes (measured, 2-core CPU).
    """

    gate_up: Linear  # w13 [2I, D]: w1 rows, then w3 rows
    down: Linear  # w2 [D, I]


def make_experts(w13: torch.Tensor, w2: torch.Tensor) -> list[Expert]:
    """Per-expert MLPs over stacked weights w13 [E, 2I, D] (w1 rows, then w3 rows) and w2 [E, D, I].

    NOTE: oneDNN matmuls even where the project's CPU kernels run: this is the portable path;
    there the "cpu" backend runs every expert of the layer in one kernel call instead.
    """
    return [Expert(Linear(w13[e]), Linear(w2[e])) for e in range(w2.shape[0])]


def fused_moe(
    x: torch.Tensor,  # [T, D]
    experts: Sequence[Expert],
    topk_weights: torch.Tensor,  # [T, k] fp32
    topk_ids: torch.Tensor,  # [T, k]
    lora: "ExpertLoRA | None" = None,
) -> torch.Tensor:
    """sum_k weight_k * expert_k(x) for each token's k chosen experts (with `lora`: each pair's adapter
    added to w1/w3 before the activation and to w2).

    NOTE: tokens are grouped by expert (one stable sort) so each active expert runs one
    matmul over all of its tokens: efficient from batch 1 (two small matmuls) to thousands
    of tokens, with no per-token weight gathers and no loop over tokens. All experts' first
    matmuls run back to back, then one silu-and-product over every row, then the second
    matmuls: the small element-wise ops run once per layer, not once per expert, because each
    one that follows a weight stream pays for cold caches (measured 22 us warm, 80 us cold).
    """
    num_tokens, top_k = topk_ids.shape
    order: torch.Tensor | None = None
    if num_tokens == 1:  # batch-1 decode: nothing to group, the token's k experts in turn
        xs = x.expand(top_k, -1)  # [k, D]
        runs = [(e, j, j + 1) for j, e in enumerate(topk_ids[0].tolist())]
    else:
        flat_ids = topk_ids.reshape(-1)  # [T*k]
        order = torch.argsort(flat_ids, stable=True)  # [T*k]
        counts = torch.bincount(flat_ids, minlength=len(experts)).tolist()
        xs = x.index_select(0, order // top_k)  # [T*k, D] each sorted slot's source token
        ends = list(itertools.accumulate(counts))
        runs = [(e, end - n, end) for e, (n, end) in enumerate(zip(counts, ends)) if n]
    h = torch.cat([experts[e].gate_up(xs[start:end]) for e, start, end in runs])  # [T*k, 2I]
    groups = None if lora is None else lora.groups(order)
    if lora is not None:
        lora.add13(h, xs, groups)
    inter = h.shape[1] // 2
    act = F.silu(h[:, :inter]) * h[:, inter:]  # [T*k, I]
    y = torch.cat([experts[e].down(act[start:end]) for e, start, end in runs])  # [T*k, D] sorted
    if lora is not None:
        lora.add2(y, act, groups)
    if order is None:
        unsorted = y  # [k, D]
    else:
        unsorted = torch.empty_like(y)  # [T*k, D] back in (token, choice) order
        unsorted[order] = y
    # NOTE: the weighted sum over a token's k outputs is a reshape, not an index_add_: it is
    # deterministic, and index_add_ (scatter_add) is slow on CPU for these shapes.
    weighted = unsorted.view(num_tokens, top_k, -1) * topk_weights.to(x.dtype).unsqueeze(-1)  # [T, k, D]
    return weighted.sum(dim=1)  # [T, D]


def cpu_moe_with_lora(
    kernel: cpu_kernels.CpuExperts,
    x: torch.Tensor,  # [T, D] bf16
    topk_weights: torch.Tensor,  # [T, k] fp32
    topk_ids: torch.Tensor,  # [T, k]
    lora: "ExpertLoRA",
) -> torch.Tensor:
    """The CPU kernel's block with adapters: their w1/w3 products go into the kernel (added before
    the activation), their w2 products onto its output, weighted as the experts' are."""
    t, k = topk_ids.shape
    groups = lora.groups()
    xs = x.repeat_interleave(k, dim=0)  # [T*k, D] each pair's token
    delta13 = torch.zeros(t * k, 2 * kernel.intermediate, dtype=torch.float32)  # [T*k, 2I]
    lora.add13(delta13, xs, groups)
    out, act = kernel.run(x, topk_weights, topk_ids, delta13)  # [T, D], [T*k, I]
    assert act is not None
    y = torch.zeros(t * k, kernel.hidden, dtype=torch.float32)  # [T*k, D]
    lora.add2(y, act, groups)
    extra = (y.view(t, k, -1) * topk_weights.float().unsqueeze(-1)).sum(dim=1)  # [T, D]
    return (out.float() + extra).to(out.dtype)
