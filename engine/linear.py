"""Weight layouts for inference: one `Linear` per weight matrix, prepared for its device and dtype.

NOTE: on CPUs PyTorch's plain bf16 `x @ W.T` streams weights at a fraction of memory
bandwidth, while oneDNN with its weight pre-reordered into its blocked layout streams them
near bandwidth (see benchmarks/torch_cpu_matmul_study.py). Decode is bound by reading weights,
so bf16 weights on CPU are reordered once at start-up and the originals released. Where the
project's own kernels run (`engine.cpu_kernels`: AMX or AVX512-BF16) they take the weight instead,
with less cost per call, and read fp8 weights as they are.
"""

from __future__ import annotations

import torch

from engine import cpu_kernels
from engine.quant import FP8, quantize_act_fp8
from engine.triton_support import has_fp8_tensor_cores

# Batch-size hint for oneDNN's reorder: decode steps run a few to a few tens of rows.
_ONEDNN_BATCH_HINT = 16


def onednn_bf16_available() -> bool:
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def check_scaled_mm(device: torch.device) -> None:
    """Raises a clear error where `torch._scaled_mm` cannot run an fp8 weight (checked at load, not
    at the first request): on GPUs it needs fp8 tensor cores, compute capability 8.9 or newer."""
    if device.type == "cuda" and not has_fp8_tensor_cores(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(
            f"fp8 weights on {torch.cuda.get_device_name(device)} (compute capability {major}.{minor}): "
            "torch._scaled_mm needs 8.9 or newer (Ada, Hopper); serve this GPU without quantization='fp8'"
        )


class Linear:
    """y = x @ W.T for one weight W [N, K], in the fastest layout for where it lives.

    An fp8 weight comes with one fp32 scale per output row [N]. With `isa` (the CPU kernels'
    instruction set, `engine.cpu_kernels`) a bf16 or fp8 CPU weight of whole panels goes to the
    project's kernel. Otherwise fp8 runs as `torch._scaled_mm` with activations quantised per
    token (fp8 tensor cores on GPUs; PyTorch's CPU kernel is correct but slow, so without our
    kernels fp8 reaches CPUs dequantised, engine/loader.py), and bf16 CPU weights go to oneDNN.
    """

    __slots__ = ("weight", "packed", "kernel", "scale", "out_features")

    def __init__(
        self, weight: torch.Tensor, scale: torch.Tensor | None = None, isa: cpu_kernels.Isa | None = None
    ) -> None:
        if (weight.dtype == FP8) != (scale is not None):
            raise ValueError("an fp8 weight needs its per-row scales, and only an fp8 weight takes them")
        self.out_features = weight.shape[0]
        self.packed: torch.Tensor | None = None
        self.kernel: cpu_kernels.CpuLinear | None = None
        self.weight = weight
        self.scale = None if scale is None else scale.float().view(1, -1)  # [1, N]
        if weight.dtype == FP8 and not (isa is not None and weight.device.type == "cpu"):
            check_scaled_mm(weight.device)
        if isa is not None and weight.device.type == "cpu" and cpu_kernels.fits_linear(*weight.shape):
            self.kernel = cpu_kernels.CpuLinear(isa, weight, scale)
            self.weight = weight.new_empty(0)  # the packed copy is the only one kept
        elif weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and onednn_bf16_available():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), _ONEDNN_BATCH_HINT)
            self.weight = weight.new_empty(0)  # the reordered copy is the only one kept

    @property
    def repacked(self) -> bool:
        """Whether the weight lives only in a kernel's own layout (the original was released)."""
        return self.kernel is not None or self.packed is not None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(x)  # [M, N]
        return self._packed(x) if self.packed is not None else self._plain(x)  # [M, N]

    def _plain(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            return x @ self.weight.t()  # [M, N]
        x8, x_scale = quantize_act_fp8(x)  # [M, K] fp8, [M, 1]
        # The weight's transpose is column-major, the layout the fp8 GEMM wants for its second operand.
        # NOTE: on GPUs, with row-wise scales, the GEMM writes bf16 only; fp16 and fp32 engines cast after.
        out_dtype = x.dtype if x.device.type == "cpu" else torch.bfloat16
        y = torch._scaled_mm(x8, self.weight.t(), scale_a=x_scale, scale_b=self.scale, out_dtype=out_dtype)
        return y.to(x.dtype)  # [M, N]

    def _packed(self, x: torch.Tensor) -> torch.Tensor:
        assert self.packed is not None
        if x.shape[0] == 0:
            return x.new_empty(0, self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, None, "none", [], "")  # [M, N]
