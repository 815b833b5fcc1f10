"""Load a Mixtral checkpoint (Hugging Face or Mistral layout) into the engine's model.

Tensors are read one at a time with `safe_open` and copied (converting dtype) straight into
the preallocated fused parameters, so peak memory stays near the final model size.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from tqdm import tqdm

from engine.cpu_kernels import Isa
from engine.model import Mixtral
from engine.moe import MoEBackend
from engine.parallel import TPGroup, check_tp_size
from engine.quant import dequantize_fp8, is_quantised, quantize_fp8, read_fp8_config, row_scales, split_fp8_name
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


def _checkpoint_scale(where: dict[str, Any], key: str) -> torch.Tensor:
    """The stored scale of pre-quantised fp8 tensor `key`."""
    base = key.removesuffix(".weight")
    scale_key = next((base + s for s in (".weight_scale", ".qscale_weight") if base + s in where), None)
    if scale_key is None:
        raise CheckpointError(f"fp8 tensor {key!r} has no weight_scale / qscale_weight beside it")
    return where[scale_key].get_tensor(scale_key)


def _fp8_slice(
    handle: Any,
    where: dict[str, Any],
    key: str,
    rows_total: int,
    stored_fp8: bool,
    shard: tuple[int, int, int] | None,
    per_channel: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of weight `key` ([rows_total, K] in the file) in fp8 and its per-row
    scales: stored fp8 as it is, else quantised from the whole tensor (scales as a checkpoint's
    would be), then sliced.

    NOTE: w1 and w3 (and q/k/v) carry different per-tensor scales but share one engine parameter.
    Rather than requantising the parts to the larger scale (vLLM's choice, which rounds the
    smaller-scale part a second time), every row keeps its own scale: the fused parameter holds
    exactly the checkpoint's values, and the kernels apply per-row scales after the K loop anyway.
    """
    if stored_fp8:
        w8, rows = _read(handle, key, shard), row_scales(_checkpoint_scale(where, key), rows_total)  # [N]
    else:
        full8, scale = quantize_fp8(handle.get_tensor(key), per_channel)
        w8, rows = _read(_Whole(full8), key, shard), row_scales(scale, full8.shape[0])  # [N]
    if shard is not None and shard[0] == 0:
        rows = rows[shard[1] : shard[2]]
    return w8, rows


def holds_fp8(model: Mixtral, hf_name: str) -> bool:
    """Whether checkpoint weight `hf_name` is kept in fp8 (with `scale_slot`) rather than dequantised."""
    return model.fp8_weights and is_quantised(hf_name)


def scale_slot(model: Mixtral, hf_name: str) -> torch.Tensor:
    """The per-row fp32 scales [rows] of an fp8 weight's slot (the rows `weight_slot` returns)."""
    if not holds_fp8(model, hf_name):
        raise KeyError(hf_name)
    return _slot(model, hf_name, scales=True)


def weight_slot(model: Mixtral, hf_name: str) -> torch.Tensor:
    """The view of an engine parameter that holds (this rank's slice of) tensor `hf_name`."""
    return _slot(model, hf_name, scales=False)


def _slot(model: Mixtral, hf_name: str, scales: bool) -> torch.Tensor:
    if hf_name == "model.embed_tokens.weight":
        return model.embed
    if hf_name == "model.norm.weight":
        return model.norm.weight
    if hf_name == "lm_head.weight":
        return model.lm_head
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", hf_name)
    if not m or int(m.group(1)) >= len(model.layers):
        raise KeyError(hf_name)
    layer, rest = model.layers[int(m.group(1))], m.group(2)
    attn, moe = layer.attn, layer.moe
    # A per-row scale vector is sliced exactly like its weight's rows.
    qkv, o, w13, w2 = (
        (attn.qkv_scale, attn.o_scale, moe.w13_scale, moe.w2_scale) if scales else (attn.qkv, attn.o, moe.w13, moe.w2)
    )
    assert qkv is not None and o is not None and w13 is not None and w2 is not None
    q, kv = model.local.n_heads * model.cfg.head_dim, model.local.n_kv_heads * model.cfg.head_dim
    inter = model.local.intermediate
    fixed = {
        "input_layernorm": layer.attn_norm.weight,
        "post_attention_layernorm": layer.ffn_norm.weight,
        "self_attn.q_proj": qkv[:q],
        "self_attn.k_proj": qkv[q : q + kv],
        "self_attn.v_proj": qkv[q + kv :],
        "self_attn.o_proj": o,
        "block_sparse_moe.gate": moe.gate,
    }
    if rest in fixed:
        return fixed[rest]
    e = re.fullmatch(r"block_sparse_moe\.experts\.(\d+)\.(w[123])", rest)
    if not e or int(e.group(1)) >= model.cfg.num_local_experts:
        raise KeyError(hf_name)
    expert, which = int(e.group(1)), e.group(2)
    if which == "w2":
        return w2[expert]
    return w13[expert, :inter] if which == "w1" else w13[expert, inter:]


def load_weights(
    model: Mixtral,
    model_dir: Path,
    fmt: CheckpointFormat,
    progress: bool = True,
    quantization: Quantization = None,
    per_channel: bool = False,
) -> None:
    """Fills every parameter of `model` (this rank's slices) from the checkpoint.

    fp8: `quantization="fp8"` quantises each checkpoint tensor on its own, as fp8 checkpoints
    are written, so both give the same model. On the Triton MoE backend (GPUs) the weights stay
    fp8 with per-row scales (experts for the fused kernel, attention for `torch._scaled_mm`), and
    on the cpu backend for the project's CPU kernels (engine/cpu_kernels.c), which widen them to
    bf16 in registers; otherwise they run as fp8-rounded weights in the compute dtype (PyTorch's
    own CPU fp8 matmuls cost more than the bytes they save, engine/quant.py). Static activation
    scales are not used.
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
                is_fp8 = handle.get_slice(key).get_dtype() == "F8_E4M3"
                rows: torch.Tensor | None = None  # per-row scales [N'] of a weight kept in fp8
                if (is_fp8 or quantization == "fp8") and is_quantised(hf_name):
                    tensor, rows = _fp8_slice(handle, where, key, shape[0], is_fp8, shard, per_channel)  # [N', K'], [N']
                    if not holds_fp8(model, hf_name):
                        tensor, rows = dequantize_fp8(tensor, rows, torch.float32), None
                else:
                    tensor = _read(handle, key, shard)
                if fmt == "mistral" and rotary_heads(hf_name, cfg) is not None:
                    heads = tensor.shape[0] // cfg.head_dim
                    tensor = permute_mistral_to_hf(tensor, heads)
                    rows = None if rows is None else permute_mistral_to_hf(rows[:, None], heads)[:, 0]
                weight_slot(model, hf_name).copy_(tensor)
                if rows is not None:
                    scale_slot(model, hf_name).copy_(rows)
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
    moe_backend: MoEBackend = "torch",
    cpu_isa: Isa | None = None,
) -> tuple[Mixtral, ModelConfig]:
    """The model, or with `tp` this rank's shard of it (each rank reads only its own slices).

    fp8 weights stay fp8 on the backends whose kernels read them (triton, cpu); elsewhere they
    are dequantised at load.
    """
    model_dir = Path(model_dir)
    cfg, fmt = load_model_config(model_dir)
    if tp is not None:
        check_tp_size(cfg, tp.world_size)
    fp8 = quantization == "fp8" or read_fp8_config(model_dir) is not None
    model = Mixtral(cfg, dtype, tp, moe_backend, fp8_weights=fp8 and moe_backend in ("triton", "cpu"), cpu_isa=cpu_isa)
    load_weights(model, model_dir, fmt, progress, quantization, per_channel)
    return model.eval(), cfg
