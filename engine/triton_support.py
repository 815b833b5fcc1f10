"""What the GPU paths ask of the device: whether Triton interprets (CPU tests), and whether the
GPU has fp8 tensor cores. No triton import here, so CPU-only code can ask too."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """Triton runs kernels in its interpreter (`TRITON_INTERPRET=1`, Triton's own switch): the CPU tests."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def has_fp8_tensor_cores(device: torch.device) -> bool:
    """Compute capability 8.9 (Ada) or 9.0+ (Hopper); the interpreter and CPUs emulate fp8 dots."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9)
