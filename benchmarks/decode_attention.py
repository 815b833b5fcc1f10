#!/usr/bin/env python3
"""Decode attention on the CPU: the project's kernel against the PyTorch path, same process.

  python benchmarks/decode_attention.py [--batch 1 16 64] [--context 96 512 1024 4096]

One query token per sequence over a paged K/V cache in 16-token blocks scattered at random over
the pool (as a long-running server's pool ends up), "bench" head layout (16 query heads, 4 KV
heads, head dim 64) unless told otherwise. `engine.cpu_kernels.DecodeAttention` reads the blocks
in place; the PyTorch path (`engine.attention.paged_attention` without a kernel) gathers each
sequence's K/V and runs SDPA. Prints ms per call (median of interleaved passes), the K/V bytes
read per second, and kernel / PyTorch speed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine import cpu_kernels  # noqa: E402
from engine.attention import AttentionMetadata, paged_attention  # noqa: E402

BLOCK = 16


def _case(batch: int, context: int, heads: int, kv_heads: int, head_dim: int, gen: torch.Generator) -> tuple:
    blocks = batch * -(-context // BLOCK)
    k_cache = torch.randn(blocks * BLOCK, kv_heads, head_dim, generator=gen).bfloat16()  # [S, KVH, hd]
    v_cache = torch.randn(blocks * BLOCK, kv_heads, head_dim, generator=gen).bfloat16()  # [S, KVH, hd]
    table = torch.randperm(blocks, generator=gen).view(batch, -1)  # [B, blocks per sequence]
    slots = (table[:, :, None] * BLOCK + torch.arange(BLOCK)).flatten(1)[:, :context].contiguous()  # [B, L]
    last = torch.full((batch,), context - 1)  # [B]
    meta = AttentionMetadata(
        slot_mapping=slots[:, -1], num_decode=batch, decode_slots=slots,
        decode_mask=torch.ones(batch, 1, 1, context, dtype=torch.bool), prefills=[],
        decode_first=torch.zeros(batch, dtype=torch.int64), decode_last=last,
    )
    q = torch.randn(batch, heads, head_dim, generator=gen).bfloat16()  # [B, H, hd]
    kv = torch.randn(batch, kv_heads, head_dim, generator=gen).bfloat16()  # this step's K/V: [B, KVH, hd]
    return q, kv, k_cache, v_cache, meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--context", type=int, nargs="+", default=[96, 512, 1024, 4096])
    parser.add_argument("--heads", type=int, nargs=3, default=[16, 4, 64], metavar=("H", "KVH", "HD"))
    parser.add_argument("--passes", type=int, default=5)
    args = parser.parse_args()
    heads, kv_heads, head_dim = args.heads
    isa = cpu_kernels.resolve_isa("auto", torch.device("cpu"), torch.bfloat16)
    if isa is None or not cpu_kernels.fits_attention(heads, kv_heads, head_dim):
        sys.exit("this CPU or head layout has no decode-attention kernel")
    kernel = cpu_kernels.DecodeAttention(isa, heads, kv_heads, head_dim)
    gen = torch.Generator().manual_seed(0)
    print(f"{isa} kernel, H={heads} KVH={kv_heads} hd={head_dim}, {torch.get_num_threads()} threads")
    print(f"{'batch':>5} {'context':>7} {'kernel ms':>10} {'GB/s':>6} {'torch ms':>9} {'GB/s':>6} {'speed-up':>8}")
    for batch in args.batch:
        for context in args.context:
            q, kv, k_cache, v_cache, meta = _case(batch, context, heads, kv_heads, head_dim, gen)
            ways = {"kernel": kernel, "torch": None}
            times: dict[str, list[float]] = {name: [] for name in ways}
            reps = max(1, int(2e6 // (batch * context)))  # calls per timing: ~2 M K/V positions
            for _ in range(args.passes):  # interleaved, so drift in the shared box hits both alike
                for name, way in ways.items():
                    paged_attention(q, kv, kv, k_cache, v_cache, meta, way)  # warm
                    t = time.perf_counter()
                    for _ in range(reps):
                        paged_attention(q, kv, kv, k_cache, v_cache, meta, way)
                    times[name].append((time.perf_counter() - t) / reps)
            kv_bytes = 2 * batch * context * kv_heads * head_dim * 2
            ms = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
            print(f"{batch:>5} {context:>7} {ms['kernel']:>10.3f} {kv_bytes / ms['kernel'] / 1e6:>6.1f} "
                  f"{ms['torch']:>9.3f} {kv_bytes / ms['torch'] / 1e6:>6.1f} {ms['torch'] / ms['kernel']:>7.1f}x")


if __name__ == "__main__":
    main()
