"""Attention over the paged KV cache.

The KV cache of one layer is a flat array of slots `[num_blocks * block_size, KVH, hd]`; a
sequence's context is the list of slots its block table points to. The model runner builds
`AttentionMetadata` once per step and every layer reuses it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

AttentionBackend = Literal["torch", "triton", "cpu"]

# (q [B, H, hd], k_cache, v_cache, slots [B, L], first [B], last [B]) -> [B, H, hd]
DecodeKernel = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor
]


def resolve_attention_backend(
    choice: Literal["auto", "torch", "triton", "cpu"], device: torch.device, cpu_kernels_run: bool
) -> AttentionBackend:
    """The decode-attention kernel for `choice` ("auto": triton on GPUs, the CPU kernel where the
    project's CPU kernels run, else SDPA over gathered contexts)."""
    if choice == "auto":
        return "triton" if device.type == "cuda" else "cpu" if cpu_kernels_run else "torch"
    if choice == "cpu" and not cpu_kernels_run:
        raise ValueError("attention_backend 'cpu' needs the CPU kernels (cpu_kernels 'auto', 'amx' or 'avx512' on "
                         "a CPU that runs them, bf16)")
    return choice


@dataclass
class PrefillChunk:
    """Query tokens of one sequence processed this step (a whole prompt or a chunk of it)."""

    start: int  # offset of the first query token in the flat batch
    num_tokens: int  # query tokens in this chunk
    context_slots: torch.Tensor  # [C] cache slots of every context position, this chunk included
    # [q, C] True = attend, only where a sliding window cuts into the context; None: causal, over
    # the chunk alone when it starts the sequence (C == q), else over the whole context.
    mask: torch.Tensor | None


@dataclass
class AttentionMetadata:
    """Where this step's tokens write K/V and what each query attends to.

    NOTE: decode tokens (one per sequence) come first in the flat batch so they are served
    by one batched attention call; prefill chunks follow, each its own call.
    """

    slot_mapping: torch.Tensor  # [T] cache slot for each new token's K/V
    num_decode: int  # decode tokens at the front of the batch
    decode_slots: torch.Tensor | None  # [B, L] cache slots of each decode sequence's context
    decode_mask: torch.Tensor | None  # [B, 1, 1, L] True = attend (real, in-window positions)
    prefills: list[PrefillChunk]
    # The same visibility as positions, for kernels that read the cache in place: [B] each, int64.
    decode_first: torch.Tensor | None = None  # first visible position (sliding window)
    decode_last: torch.Tensor | None = None  # the query's own position


def write_kv(
    k: torch.Tensor,  # [T, KVH, hd] (rotary applied)
    v: torch.Tensor,  # [T, KVH, hd]
    k_cache: torch.Tensor,  # [S, KVH, hd]
    v_cache: torch.Tensor,  # [S, KVH, hd]
    slot_mapping: torch.Tensor,  # [T]
) -> None:
    """This step's K/V into their cache slots (the CPU kernels do it with the rotary instead)."""
    k_cache.index_copy_(0, slot_mapping, k)
    v_cache.index_copy_(0, slot_mapping, v)


def paged_attention(
    q: torch.Tensor,  # [T, H, hd] (rotary applied)
    k: torch.Tensor,  # [T, KVH, hd]
    v: torch.Tensor,  # [T, KVH, hd]
    k_cache: torch.Tensor,  # [S, KVH, hd], this step's K already written
    v_cache: torch.Tensor,  # [S, KVH, hd], this step's V already written
    meta: AttentionMetadata,
    decode_kernel: DecodeKernel | None = None,
) -> torch.Tensor:
    """Attention of this step's queries over the cache; returns [T, H * hd].

    `decode_kernel` serves the decode rows straight from the cache (engine.cpu_kernels) instead
    of gathering their contexts for SDPA."""
    out = torch.empty_like(q)  # [T, H, hd]
    b = meta.num_decode
    if b and decode_kernel is not None and meta.decode_first is not None and meta.decode_last is not None:
        assert meta.decode_slots is not None
        out[:b] = decode_kernel(q[:b], k_cache, v_cache, meta.decode_slots, meta.decode_first, meta.decode_last)
    elif b:
        assert meta.decode_slots is not None
        kc = k_cache[meta.decode_slots].transpose(1, 2)  # [B, KVH, L, hd]
        vc = v_cache[meta.decode_slots].transpose(1, 2)  # [B, KVH, L, hd]
        o = F.scaled_dot_product_attention(
            q[:b].unsqueeze(2), kc, vc, attn_mask=meta.decode_mask, enable_gqa=True
        )  # [B, H, 1, hd]
        out[:b] = o.squeeze(2)
    for chunk in meta.prefills:
        sl = slice(chunk.start, chunk.start + chunk.num_tokens)
        qs = q[sl].transpose(0, 1).unsqueeze(0)  # [1, H, q, hd]
        context = chunk.context_slots.shape[0]
        if context == chunk.num_tokens:  # no cached context: attend to the fresh K/V directly
            kc, vc = k[sl], v[sl]  # [q, KVH, hd]
        else:
            kc, vc = k_cache[chunk.context_slots], v_cache[chunk.context_slots]  # [C, KVH, hd]
        mask = chunk.mask
        if mask is None and context > chunk.num_tokens:
            # NOTE: causal over a longer context is the lower-right variant, which flash attention
            # runs as it is (GQA included); a boolean mask would force PyTorch's math backend, an
            # fp32 [H, q, C] score matrix (8.6 GB per layer for a 2K chunk over 32K context).
            mask = causal_lower_right(chunk.num_tokens, context)
        o = F.scaled_dot_product_attention(
            qs,
            kc.transpose(0, 1).unsqueeze(0),
            vc.transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            is_causal=mask is None,
            enable_gqa=True,
        )  # [1, H, q, hd]
        out[sl] = o[0].transpose(0, 1)
    return out.flatten(1)
