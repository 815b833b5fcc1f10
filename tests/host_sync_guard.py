"""A guard that fails on any host-synchronising call the engine makes inside a region that a CUDA
graph would capture: on a GPU such a call either breaks the capture or stalls every step.

It runs on CPU, where nothing synchronises, by refusing the calls that would: reading values to
the host (`.item()`, `.tolist()`, `.cpu()`, `int(t)`, `bool(t)`, `.numpy()`), and the ops whose
output size depends on values (`bincount`, `nonzero`, `unique`, `masked_select`, boolean-mask
indexing, `repeat_interleave` with tensor repeats). Only calls made from the project's `engine/`
code count: Triton's interpreter reads kernel arguments to the host on CPU, which a GPU never does.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

ENGINE_DIR = str(Path(__file__).resolve().parents[1] / "engine")

_READS = {
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy,
    torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__bool__, torch.Tensor.__index__,
}
_VALUE_SHAPED = {
    torch.bincount, torch.Tensor.bincount, torch.nonzero, torch.Tensor.nonzero, torch.unique,
    torch.Tensor.unique, torch.masked_select, torch.Tensor.masked_select, torch.argwhere,
}


class HostSyncError(AssertionError):
    pass


def _has_bool_index(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _engine_caller() -> str | None:
    """`file:line` of the innermost engine frame that called into torch, if the call came from there."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(ENGINE_DIR):
            return f"{Path(name).name}:{frame.f_lineno}"
        if "torch" not in name and name != __file__:
            return None  # another library (Triton's interpreter) made the call
        frame = frame.f_back
    return None


class NoHostSync(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        bad = func in _READS or func in _VALUE_SHAPED
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and len(args) > 1:
            bad = _has_bool_index(args[1])
        if func in (torch.repeat_interleave, torch.Tensor.repeat_interleave):
            bad = len(args) > 1 and isinstance(args[1], torch.Tensor)
        if func is torch.where and len(args) == 1:
            bad = True
        if bad and (where := _engine_caller()) is not None:
            raise HostSyncError(f"{getattr(func, '__qualname__', func)} at {where} synchronises with the host")
        return func(*args, **kwargs)
