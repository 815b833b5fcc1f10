"""Load a Mixtral checkpoint (Hugging Face or Mistral layout) into the engine's model.

Tensors are read one at a time with `safe_open` and copied (converting dtype) straight into
the preallocated fused parameters, so peak memory stays near the final model size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from tqdm import tqdm

from engine.model import Mixtral
from engine.parallel import TPGroup, check_tp_size
from engine.quant import FP8, dequantize_fp8, is_quantised, quantize_fp8, split_fp8_name
from engine.model_config import CheckpointFormat, ModelConfig, load_model_config
from engine.weight_names import hf_tensor_shapes, mistral_to_hf, permute_mistral_to_hf, rotary_heads

Quantization = Literal["fp8"] | None

# Tensors real checkpoints carry that the engine recomputes itself.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint that does not match the model it claims to be."""


def weight_files(model_dir: Path, fmt: CheckpointFormat) -> list[Path]:
    if fmt == "mistral":
        files = sorted(model_dir.glob("consolidated*.safetensors"))
        if not files:
            raise CheckpointError(f"{model_dir} has params.json but no consolidated*.safetensors")
        return files
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard files that do not exist: {missing}")
        return [model_dir / n for n in names]
    if (model_dir / "model.safetensors").is_file():
        return [model_dir / "model.safetensors"]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir} has config.json but no *.safetensors weight files")
    return files


class _Whole:
    """A tensor already in memory, read like a safetensors handle."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def get_tensor(self, key: str) -> torch.Tensor:
        return self.tensor

    def get_slice(self, key: str) -> torch.Tensor:
        return self.tensor


def _read(handle: Any, key: str, shard: tuple[int, int, int] | None) -> torch.Tensor:
    """The whole tensor, or only this rank's slice of it (never materialising the rest)."""
    if shard is None:
        return handle.get_tensor(key)
    dim, start, stop = shard
    sl = handle.get_slice(key)
    return sl[start:stop] if dim == 0 else sl[:, start:stop]


def _dequantized(
    where: dict[str, Any], key: str, w8: torch.Tensor, shard: tuple[int, int, int] | None
) -> torch.Tensor:
    """A pre-quantised fp8 slice times its checkpoint scale (per tensor, or this slice's rows)."""
    base = key.removesuffix(".weight")
    scale_key = next((base + s for s in (".weight_scale", ".qscale_weight") if base + s in where), None)
    if scale_key is None:
        raise CheckpointError(f"fp8 tensor {key!r} has no weight_scale / qscale_weight beside it")
    scale = where[scale_key].get_tensor(scale_key).float().reshape(-1)
    if scale.numel() > 1 and shard is not None and shard[0] == 0:
        scale = scale[shard[1] : shard[2]]
    return dequantize_fp8(w8, scale if scale.numel() > 1 else scale[0], torch.float32)


def load_weights(
    model: Mixtral,
    model_dir: Path,
    fmt: CheckpointFormat,
    progress: bool = True,
    quantization: Quantization = None,
    per_channel: bool = False,
) -> None:
    """Fills every parameter of `model` (this rank's slices) from the checkpoint.

    NOTE: fp8 runs as fp8-rounded weights in the compute dtype: on CPU converting fp8 inside the
    matmul costs more than the bytes it saves (engine/quant.py), so pre-quantised checkpoints are
    dequantised here and `quantization="fp8"` quantises each checkpoint tensor on its own, as fp8
    checkpoints are written, so both give the same model. Static activation scales are not used.
    """
    cfg = model.cfg
    expected = hf_tensor_shapes(cfg)
    files = weight_files(model_dir, fmt)
    seen: set[str] = set()
    handles = [safe_open(str(f), framework="pt") for f in files]
    where = {key: h for h in handles for key in h.keys()}
    with tqdm(total=len(where), desc=f"loading {model_dir.name}", unit="tensor", disable=not progress) as bar:
        for path, handle in zip(files, handles):
            for key in handle.keys():
                bar.update()
                if key.endswith(_IGNORED_SUFFIXES) or split_fp8_name(key)[1] != "weight":
                    continue  # scales are read together with their weight
                hf_name = mistral_to_hf(key) if fmt == "mistral" else key
                if hf_name not in expected:
                    raise CheckpointError(f"unexpected tensor {key!r} in {path}: not part of this Mixtral config")
                shape = tuple(handle.get_slice(key).get_shape())
                if shape != expected[hf_name]:
                    raise CheckpointError(
                        f"tensor {key!r} in {path} has shape {list(shape)}, expected {list(expected[hf_name])}"
                    )
                if hf_name in seen:
                    raise CheckpointError(f"tensor {key!r} appears twice (again in {path})")
                shard = model.local.shard(hf_name, cfg)
                if quantization == "fp8" and is_quantised(hf_name) and handle.get_slice(key).get_dtype() != "F8_E4M3":
                    # Scales come from the whole tensor (as a checkpoint's would), then this rank's slice.
                    full = dequantize_fp8(*quantize_fp8(handle.get_tensor(key), per_channel), torch.float32)
                    tensor = _read(_Whole(full), key, shard)
                else:
                    tensor = _read(handle, key, shard)
                    if tensor.dtype == FP8:
                        tensor = _dequantized(where, key, tensor, shard)
                if fmt == "mistral" and rotary_heads(hf_name, cfg) is not None:
                    tensor = permute_mistral_to_hf(tensor, tensor.shape[0] // cfg.head_dim)
                model.weight_slot(hf_name).copy_(tensor)
                seen.add(hf_name)
    missing = [n for n in expected if n not in seen]
    if missing:
        shown = ", ".join(f"{n} {list(expected[n])}" for n in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(
            f"checkpoint {model_dir} is missing {len(missing)} tensor(s): {shown}{more} "
            f"(searched {', '.join(f.name for f in files)})"
        )


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype,
    progress: bool = True,
    tp: TPGroup | None = None,
    quantization: Quantization = None,
    per_channel: bool = False,
) -> tuple[Mixtral, ModelConfig]:
    """The model, or with `tp` this rank's shard of it (each rank reads only its own slices)."""
    model_dir = Path(model_dir)
    cfg, fmt = load_model_config(model_dir)
    if tp is not None:
        check_tp_size(cfg, tp.world_size)
    model = Mixtral(cfg, dtype, tp)
    load_weights(model, model_dir, fmt, progress, quantization, per_channel)
    return model.eval(), cfg
