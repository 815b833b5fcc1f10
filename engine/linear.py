"""Weight layouts for inference: one `Linear` per weight matrix, prepared for its device and dtype.

NOTE: on CPUs PyTorch's plain bf16 `x @ W.T` streams weights at a fraction of memory
bandwidth, while oneDNN with its weight pre-reordered into its blocked layout streams them
near bandwidth (see benchmarks/peers/cpu_kernels.py). Decode is bound by reading weights,
so bf16 weights on CPU are reordered once at start-up and the originals released.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Batch-size hint for oneDNN's reorder: decode steps run a few to a few tens of rows.
_ONEDNN_BATCH_HINT = 16


def onednn_bf16_available() -> bool:
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class Linear:
    """y = x @ W.T for one weight W [N, K], in the fastest layout for where it lives."""

    __slots__ = ("weight", "packed", "out_features")

    def __init__(self, weight: torch.Tensor) -> None:
        self.out_features = weight.shape[0]
        self.packed: torch.Tensor | None = None
        self.weight = weight
        if weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and onednn_bf16_available():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), _ONEDNN_BATCH_HINT)
            self.weight = weight.new_empty(0)  # the reordered copy is the only one kept

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._packed(x, "none") if self.packed is not None else x @ self.weight.t()  # [M, N]

    def silu(self, x: torch.Tensor) -> torch.Tensor:
        """silu(x @ W.T), the activation fused into the matmul where the kernel can."""
        if self.packed is not None:
            return self._packed(x, "swish")  # [M, N]
        return F.silu(x @ self.weight.t())  # [M, N]

    def times(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """(x @ W.T) * other, the product fused into the matmul where the kernel can."""
        if self.packed is None:
            return (x @ self.weight.t()) * other  # [M, N]
        if x.shape[0] == 0:
            return x.new_empty(0, self.out_features)
        return torch.ops.mkldnn._linear_pointwise.binary(x.contiguous(), other, self.packed, None, "mul")  # [M, N]

    def _packed(self, x: torch.Tensor, post_op: str) -> torch.Tensor:
        assert self.packed is not None
        if x.shape[0] == 0:
            return x.new_empty(0, self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, None, post_op, [], "")  # [M, N]
