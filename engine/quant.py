"""fp8 (e4m3) weights: quantisation, the CPU matmul path and pre-quantised checkpoints.

Scale conventions (the engine's and Hugging Face's): `w ≈ w8.float() * scale`, scale fp32.
- per-tensor: one scale per weight matrix, shape `[]` for `[N, K]`, `[E]` for stacked experts `[E, N, K]`;
- per-channel: one scale per output row, shape `[N]` / `[E, N]`.
The ranks tell the two apart: a per-tensor scale has `w.ndim - 2` dims, a per-channel one `w.ndim - 1`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.checkpoint import Layout, write_checkpoint
from engine.model_config import ModelConfig
from engine.weight_names import mistral_to_hf

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448

ActivationScheme = Literal["static", "dynamic"]


# ---- quantise / dequantise ---------------------------------------------------------------
def _amax_scale(amax: torch.Tensor) -> torch.Tensor:
    # An all-zero row/matrix gets scale 1 (its fp8 values are 0 whatever the scale), never 0 or inf.
    amax = amax.float()
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


def _to_fp8(v: torch.Tensor) -> torch.Tensor:
    # Saturate explicitly rather than rely on the cast's out-of-range behaviour (torch 2.13 saturates
    # too, but it is no documented guarantee); static activation scales do overflow.
    return v.clamp(-FP8_MAX, FP8_MAX).to(FP8)


def expand_scale(scale: torch.Tensor, w_ndim: int) -> torch.Tensor:
    """View a per-tensor or per-channel scale so it broadcasts against a weight of rank `w_ndim`."""
    if scale.ndim == w_ndim - 2:  # per-tensor: [] or [E]
        return scale[..., None, None]
    if scale.ndim == w_ndim - 1:  # per-channel: [N] or [E, N]
        return scale[..., None]
    raise ValueError(f"scale of shape {list(scale.shape)} fits no weight of rank {w_ndim}")


def quantize_fp8(w: torch.Tensor, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`w [N, K]` or `[E, N, K]` -> (fp8 weight of w's shape, fp32 scale; see the module docstring)."""
    if w.ndim not in (2, 3):
        raise ValueError(f"expected a [N, K] or [E, N, K] weight, got shape {list(w.shape)}")
    wf = w.float()
    amax = wf.abs().amax(dim=-1) if per_channel else wf.abs().amax(dim=(-2, -1))  # [..., N] or [...]
    scale = _amax_scale(amax)
    return _to_fp8(wf / expand_scale(scale, w.ndim)), scale


def dequantize_fp8(w8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (w8.float() * expand_scale(scale.float(), w8.ndim)).to(dtype)


def quantize_act_fp8(
    x: torch.Tensor,  # [T, K]
    scale: torch.Tensor | None = None,  # static scale (scalar), else dynamic per token
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations -> (fp8 [T, K], fp32 scale [T, 1]); the static scale comes back as a stride-0 view."""
    xf = x.float()  # [T, K]
    if scale is None:
        scale = _amax_scale(xf.abs().amax(dim=-1, keepdim=True))  # [T, 1]
    else:
        scale = scale.float().reshape(1, 1).expand(x.shape[0], 1)  # [T, 1]
    return _to_fp8(xf / scale), scale


# ---- the CPU matmul -----------------------------------------------------------------------
def fp8_linear(
    x: torch.Tensor,  # [M, K]
    w8: torch.Tensor,  # [N, K] fp8
    scale: torch.Tensor,  # [] or [N]
) -> torch.Tensor:
    """`x @ dequant(w8).T` in x's dtype on CPU.

    NOTE: plain dequantise-then-matmul, the PyTorch reference for fp8 on CPU. Measured on the
    2-core CPU box (`benchmarks/fused_moe_kernel.py cpu-fp8`), no PyTorch fp8 variant beats the
    fp32 or bf16 matmul it would replace: eager conversion is ~15x slower than fp32, and the best
    torch.compile'd ones (fused dequantise-multiply-reduce GEMV, conversion into cache-sized
    blocks, a bit-level e4m3 -> fp32 decode) still ~2x slower, because converting fp8 costs more
    than streaming the bytes it saves. The engine runs fp8 on CPUs in its own kernel instead
    (`engine.cpu_kernels`, 6 instructions per 64 weights), or dequantises once at load.
    """
    w = w8.to(x.dtype)  # [N, K]
    y = x @ w.t()  # [M, N]
    return y * scale.to(x.dtype)  # per-tensor [] or per-channel [N] both broadcast over rows


# ---- pre-quantised checkpoints ------------------------------------------------------------
@dataclass(frozen=True)
class Fp8Config:
    """What a checkpoint's quantization section says; the router gate, embeddings, norms and LM
    head always stay unquantised."""

    activation_scheme: ActivationScheme


def fp8_config_from_hf(config: dict) -> Fp8Config | None:
    """config.json `quantization_config: {quant_method: "fp8", activation_scheme: ...}`."""
    q = config.get("quantization_config")
    if not q:
        return None
    if q.get("quant_method") != "fp8":
        raise ValueError(f"unsupported quantization_config.quant_method {q.get('quant_method')!r}; only 'fp8'")
    if q.get("weight_block_size"):
        raise ValueError("block-wise fp8 (weight_block_size) is not supported; only per-tensor/per-channel scales")
    scheme = q.get("activation_scheme", "dynamic")
    if scheme not in ("static", "dynamic"):
        raise ValueError(f"unsupported fp8 activation_scheme {scheme!r}")
    return Fp8Config(scheme)


def fp8_config_from_mistral(params: dict) -> Fp8Config | None:
    """params.json `quantization: {qformat_weight: "fp8_e4m3", qscheme_act: "TENSOR"|"NO_SCALES"}`."""
    q = params.get("quantization")
    if not q:
        return None
    if q.get("qformat_weight") != "fp8_e4m3":
        raise ValueError(f"unsupported quantization.qformat_weight {q.get('qformat_weight')!r}; only 'fp8_e4m3'")
    # TENSOR (the default) means one static activation scale per linear (`qscale_act`).
    return Fp8Config("dynamic" if q.get("qscheme_act") == "NO_SCALES" else "static")


def read_fp8_config(model_dir: str | Path) -> Fp8Config | None:
    """The fp8 settings of a checkpoint folder (config.json first, else params.json); None: not fp8."""
    model_dir = Path(model_dir)
    if (model_dir / "config.json").is_file():
        return fp8_config_from_hf(json.loads((model_dir / "config.json").read_text()))
    return fp8_config_from_mistral(json.loads((model_dir / "params.json").read_text()))


# Checkpoint suffix -> (the weight tensor's suffix, what the tensor is).
_SCALE_SUFFIXES = {
    ".weight_scale": "weight_scale",  # Hugging Face
    ".input_scale": "input_scale",
    ".qscale_weight": "weight_scale",  # Mistral
    ".qscale_act": "input_scale",
}
TensorKind = Literal["weight", "weight_scale", "input_scale"]


def split_fp8_name(name: str) -> tuple[str, TensorKind]:
    """`X.weight_scale` / `X.qscale_weight` -> (`X.weight`, "weight_scale"); inputs alike; else (name, "weight").

    The returned weight name goes through the usual Mistral -> HF mapping and `engine.loader.weight_slot`.
    """
    for suffix, kind in _SCALE_SUFFIXES.items():
        if name.endswith(suffix):
            return name.removesuffix(suffix) + ".weight", kind  # type: ignore[return-value]
    return name, "weight"


def row_scales(scale: torch.Tensor, rows: int) -> torch.Tensor:
    """A checkpoint weight scale (scalar, `[1]`, `[rows]` or `[rows, 1]`) as one fp32 scale per row `[rows]`."""
    flat = scale.float().reshape(-1)
    if flat.numel() == 1:
        return flat.expand(rows).clone()
    if flat.numel() != rows:
        raise ValueError(f"weight scale of shape {list(scale.shape)} does not fit a weight of {rows} rows")
    return flat.clone()


# ---- writing fp8 checkpoints (tests, benchmarks) --------------------------------------------
# NOTE: random-weight checkpoints have no calibration data; this static input scale covers the
# RMS-normed activations of the random presets (|x| up to ~8) and is only a placeholder.
STATIC_INPUT_SCALE = 8.0 / FP8_MAX
_REWRITTEN = ("config.json", "params.json", "model.safetensors.index.json")


def is_quantised(hf_name: str) -> bool:
    # Attention and expert projections; router gate, embeddings, norms and the LM head stay as they are.
    return hf_name.endswith(("_proj.weight", ".w1.weight", ".w2.weight", ".w3.weight"))


def convert_checkpoint_to_fp8(
    src: str | Path,
    dst: str | Path,
    activation_scheme: ActivationScheme = "dynamic",
    per_channel: bool = False,
) -> Path:
    """Rewrite a bf16/fp32 checkpoint folder (either layout, e.g. from `engine.checkpoint.write_checkpoint`)
    in the pre-quantised fp8 layout real fp8 checkpoints use.

    Hugging Face: `X.weight` fp8, `X.weight_scale` fp32 (`[]` per-tensor, `[N, 1]` per-channel as
    compressed-tensors writes it), `X.input_scale` `[]` when static; config.json gains
    `quantization_config`. Mistral: `qscale_weight` / `qscale_act`, params.json gains `quantization`.
    """
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    mistral = not (src / "config.json").is_file()
    files = sorted(src.glob("*.safetensors"))
    w_suffix, a_suffix = (".qscale_weight", ".qscale_act") if mistral else (".weight_scale", ".input_scale")
    weight_map: dict[str, str] = {}
    total_bytes = 0
    for path in files:
        out: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                hf_name = mistral_to_hf(key) if mistral else key
                if hf_name is None or not is_quantised(hf_name):
                    out[key] = tensor
                    continue
                w8, scale = quantize_fp8(tensor, per_channel)
                base = key.removesuffix(".weight")
                out[key] = w8
                out[base + w_suffix] = scale[:, None] if per_channel else scale  # [N, 1] or []
                if activation_scheme == "static":
                    out[base + a_suffix] = torch.tensor(STATIC_INPUT_SCALE)
        save_file(out, str(dst / path.name), metadata={"format": "pt"})
        weight_map.update({name: path.name for name in out})
        total_bytes += sum(t.numel() * t.element_size() for t in out.values())
    for extra in src.iterdir():  # tokenizer files; configs and the index are rewritten below
        if extra.is_file() and extra.suffix != ".safetensors" and extra.name not in _REWRITTEN:
            shutil.copyfile(extra, dst / extra.name)
    if (src / "model.safetensors.index.json").is_file():
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if mistral:
        params = json.loads((src / "params.json").read_text())
        qscheme = "TENSOR" if activation_scheme == "static" else "NO_SCALES"
        params["quantization"] = {"qformat_weight": "fp8_e4m3", "qscheme_act": qscheme}
        (dst / "params.json").write_text(json.dumps(params, indent=2))
    else:
        config = json.loads((src / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": activation_scheme}
        (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def write_fp8_checkpoint(
    out: str | Path,
    cfg: ModelConfig,
    layout: Layout = "hf",
    seed: int = 0,
    activation_scheme: ActivationScheme = "dynamic",
    per_channel: bool = False,
) -> Path:
    """A random-weight fp8 checkpoint: `write_checkpoint`'s bf16 weights (same seed, same model), quantised."""
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(tmp, cfg, layout=layout, seed=seed, dtype="bfloat16")
        return convert_checkpoint_to_fp8(tmp, out, activation_scheme, per_channel)
