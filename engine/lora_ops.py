"""The LoRA product of a batch where rows run different adapters: out += (x @ A_g^T) @ B_g^T per row.

Every adapter site (attention's qkv and o, the experts' w13 and w2) is one `add_lora` call over
stacked weights `a [G, n R, K]` and `b [G, R, N]` (B transposed, so a rank's row of every output
column is contiguous), G groups (an adapter slot, or slot x expert).
A site may hold several modules side by side (q, k, v in qkv's rows): `splits` gives each one's
rows of `out`, and module j reads columns [jR, (j+1)R) of the shrunk `x @ A^T`.

Four paths compute the same thing. On GPUs one Triton kernel pair, shrink then expand, reads
each row's adapter from `groups.index` (engine/lora_triton.py, punica's BGMV); the project's CPU
kernel does the same in one call where it runs (bf16, `engine.cpu_kernels.LoRAKernel`). Else, in
PyTorch, small batches (decode steps) gather each row's A and B and run one batched product per
matrix, a handful of ops whatever the number of adapters; large ones (prefill) group rows by
adapter, one small matmul pair per group and module (S-LoRA's segmented product), where gathering
would copy the weights once per row.

NOTE: the stacks end with a group of zeros (the "null" group): rows without an adapter gather it
and add exact zeros, so the gathered path needs no masks.
"""

from __future__ import annotations

import torch

from engine.cpu_kernels import LoRAKernel


class Groups:
    """Which adapter group each row of a batch runs: `index` [T] (-1: the base model only), and the
    rows of each group, found on the host once and shared by every site that uses them."""

    def __init__(self, index: torch.Tensor) -> None:
        self.index = index  # [T] int64
        self._buckets: list[tuple[int, torch.Tensor | None]] | None = None
        self._gather: torch.Tensor | None = None

    def gather_index(self, null: int) -> torch.Tensor:
        """`index` with -1 replaced by the null group (the stacks' last, all zeros) [T]."""
        if self._gather is None:
            self._gather = torch.where(self.index < 0, null, self.index)
        return self._gather

    @property
    def buckets(self) -> list[tuple[int, torch.Tensor | None]]:
        """(group, its rows [n], or None when it holds every row)."""
        if self._buckets is None:
            rows: dict[int, list[int]] = {}
            for row, group in enumerate(self.index.tolist()):
                if group >= 0:
                    rows.setdefault(group, []).append(row)
            total = self.index.numel()
            self._buckets = [(g, None if len(r) == total else torch.tensor(r, device=self.index.device))
                             for g, r in rows.items()]
        return self._buckets

    @property
    def any(self) -> bool:
        return bool(self.buckets)


def add_lora_reference(
    out: torch.Tensor,  # [T, N]
    x: torch.Tensor,  # [T, K]
    groups: Groups,
    a: torch.Tensor,  # [G, n R, K]
    b: torch.Tensor,  # [G, R, N]
    splits: tuple[int, ...],  # columns of out per module, n of them, summing to N
) -> None:
    """The segmented product in PyTorch: one shrink per group, one expand per group and module."""
    rank = b.shape[1]
    for group, rows in groups.buckets:
        xs = x if rows is None else x.index_select(0, rows)  # [n, K]
        h = xs @ a[group].t()  # [n, n R]
        start = 0
        for j, size in enumerate(splits):
            delta = (h[:, j * rank : (j + 1) * rank] @ b[group, :, start : start + size]).to(out.dtype)  # [n, size]
            if rows is None:
                out[:, start : start + size] += delta
            else:
                out[:, start : start + size].index_add_(0, rows, delta)
            start += size


def add_lora_gathered(
    out: torch.Tensor,  # [T, N]
    x: torch.Tensor,  # [T, K]
    groups: Groups,
    a: torch.Tensor,  # [G + 1, n R, K], the last group zeros
    b: torch.Tensor,  # [G + 1, R, N]
    splits: tuple[int, ...],
) -> None:
    """Each row's own A and B gathered, then one batched shrink and one batched expand per module."""
    index = groups.gather_index(a.shape[0] - 1)  # [T]
    rank = b.shape[1]
    h = torch.bmm(x.unsqueeze(1), a.index_select(0, index).transpose(1, 2))  # [T, 1, n R]
    rows_b = b.index_select(0, index)  # [T, R, N]
    start = 0
    for j, size in enumerate(splits):
        delta = torch.bmm(h[:, :, j * rank : (j + 1) * rank], rows_b[:, :, start : start + size])  # [T, 1, size]
        out[:, start : start + size] += delta.squeeze(1).to(out.dtype)
        start += size


# Gather at most this many weight elements per call (32 MiB in bf16); bigger batches go segmented.
_GATHER_LIMIT = 16 * 2**20


def add_lora(
    out: torch.Tensor, x: torch.Tensor, groups: Groups, a: torch.Tensor, b: torch.Tensor, splits: tuple[int, ...],
    kernel: LoRAKernel | None = None,
) -> None:
    """out[t] += LoRA of row t's adapter group, in place; rows of group -1 are left as they are.
    `kernel`: the project's CPU kernel, used for bf16 weights."""
    if out.device.type == "cuda":
        from engine.lora_triton import add_lora_triton  # GPU-only dependency, imported on use

        add_lora_triton(out, x, groups.index, a, b, splits)
    elif kernel is not None and a.dtype == x.dtype == torch.bfloat16 and out.is_contiguous():
        kernel(out, x, groups.index, a, b, splits)
    elif x.shape[0] * (a[0].numel() + b[0].numel()) <= _GATHER_LIMIT:
        add_lora_gathered(out, x, groups, a, b, splits)
    else:
        add_lora_reference(out, x, groups, a, b, splits)
