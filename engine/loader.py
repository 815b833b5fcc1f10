"""Load a Mixtral checkpoint (Hugging Face or Mistral layout) into the engine's model.

Tensors are read one at a time with `safe_open` and copied (converting dtype) straight into
the preallocated fused parameters, so peak memory stays near the final model size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from engine.model import Mixtral
from engine.parallel import TPGroup, check_tp_size
from engine.model_config import CheckpointFormat, ModelConfig, load_model_config
from engine.weight_names import hf_tensor_shapes, mistral_to_hf, permute_mistral_to_hf, rotary_heads

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


def _read(handle: Any, key: str, shard: tuple[int, int, int] | None) -> torch.Tensor:
    """The whole tensor, or only this rank's slice of it (never materialising the rest)."""
    if shard is None:
        return handle.get_tensor(key)
    dim, start, stop = shard
    sl = handle.get_slice(key)
    return sl[start:stop] if dim == 0 else sl[:, start:stop]


def load_weights(model: Mixtral, model_dir: Path, fmt: CheckpointFormat, progress: bool = True) -> None:
    cfg = model.cfg
    expected = hf_tensor_shapes(cfg)
    files = weight_files(model_dir, fmt)
    seen: set[str] = set()
    handles = [safe_open(str(f), framework="pt") for f in files]
    total = sum(len(list(h.keys())) for h in handles)
    with tqdm(total=total, desc=f"loading {model_dir.name}", unit="tensor", disable=not progress) as bar:
        for path, handle in zip(files, handles):
            for key in handle.keys():
                bar.update()
                if key.endswith(_IGNORED_SUFFIXES):
                    continue
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
                tensor = _read(handle, key, model.local.shard(hf_name, cfg))
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
    model_dir: str | Path, dtype: torch.dtype, progress: bool = True, tp: TPGroup | None = None
) -> tuple[Mixtral, ModelConfig]:
    """The model, or with `tp` this rank's shard of it (each rank reads only its own slices)."""
    model_dir = Path(model_dir)
    cfg, fmt = load_model_config(model_dir)
    if tp is not None:
        check_tp_size(cfg, tp.world_size)
    model = Mixtral(cfg, dtype, tp)
    load_weights(model, model_dir, fmt, progress)
    return model.eval(), cfg
