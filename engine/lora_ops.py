"""The LoRA product of a batch where rows run different adapters: out += (x @ A_g^T) @ B_g^T per row.

Every adapter site (attention's qkv and o, the experts' w13 and w2) is one `add_lora` call over
stacked weights `a [G, n R, K]` and `b [G, N, R]`, G groups (an adapter slot, or slot x expert).
A site may hold several modules side by side (q, k, v in qkv's rows): `splits` gives each one's
rows of `out`, and module j reads columns [jR, (j+1)R) of the shrunk `x @ A^T`.

Two paths compute the same thing: on CPUs rows are grouped by adapter (one small matmul pair per
group and module, S-LoRA's segmented product); on GPUs one Triton kernel pair, shrink then expand,
reads each row's adapter from `groups.index` (engine/lora_triton.py, punica's BGMV).
"""

from __future__ import annotations

import torch


class Groups:
    """Which adapter group each row of a batch runs: `index` [T] (-1: the base model only), and the
    rows of each group, found on the host once and shared by every site that uses them."""

    def __init__(self, index: torch.Tensor) -> None:
        self.index = index  # [T] int64
        self._buckets: list[tuple[int, torch.Tensor | None]] | None = None

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
    b: torch.Tensor,  # [G, N, R]
    splits: tuple[int, ...],  # rows of out per module, n of them, summing to N
) -> None:
    """The segmented product in PyTorch: one shrink per group, one expand per group and module."""
    rank = b.shape[2]
    for group, rows in groups.buckets:
        xs = x if rows is None else x.index_select(0, rows)  # [n, K]
        h = xs @ a[group].t()  # [n, n R]
        start = 0
        for j, size in enumerate(splits):
            delta = (h[:, j * rank : (j + 1) * rank] @ b[group, start : start + size].t()).to(out.dtype)  # [n, size]
            if rows is None:
                out[:, start : start + size] += delta
            else:
                out[:, start : start + size].index_add_(0, rows, delta)
            start += size


def add_lora(
    out: torch.Tensor, x: torch.Tensor, groups: Groups, a: torch.Tensor, b: torch.Tensor, splits: tuple[int, ...]
) -> None:
    """out[t] += LoRA of row t's adapter group, in place; rows of group -1 are left as they are."""
    if out.device.type == "cuda":
        from engine.lora_triton import add_lora_triton  # GPU-only dependency, imported on use

        add_lora_triton(out, x, groups.index, a, b, splits)
    else:
        add_lora_reference(out, x, groups, a, b, splits)
