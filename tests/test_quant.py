"""fp8 quantisation: error bounds, scale shapes, fused-parameter scales and fp8 checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from engine.checkpoint import PRESETS, random_weights, write_checkpoint
from engine.loader import load_model, scale_slot, weight_slot
from engine.quant import (
    FP8,
    FP8_MAX,
    STATIC_INPUT_SCALE,
    Fp8Config,
    convert_checkpoint_to_fp8,
    dequantize_fp8,
    fp8_config_from_hf,
    fp8_config_from_mistral,
    fp8_linear,
    quantize_act_fp8,
    quantize_fp8,
    read_fp8_config,
    row_scales,
    split_fp8_name,
    write_fp8_checkpoint,
)
from engine.weight_names import hf_to_mistral

# e4m3 keeps 3 mantissa bits: round-to-nearest is off by at most 2^-4 of the value for normals,
# and by half the smallest subnormal step (2^-10 in fp8 units) below 2^-6.
_REL, _SUBNORMAL = 2.0**-4, 2.0**-10


def _assert_fp8_error(w: torch.Tensor, deq: torch.Tensor, scale: torch.Tensor) -> None:
    bound = torch.maximum(w.abs() * _REL, scale * _SUBNORMAL)
    assert ((deq - w).abs() <= bound * (1 + 1e-6)).all()


@pytest.mark.parametrize("shape", [(96, 64), (4, 96, 64)])
@pytest.mark.parametrize("per_channel", [False, True])
def test_quantize_fp8_shapes_and_error(shape: tuple[int, ...], per_channel: bool) -> None:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.05
    w8, scale = quantize_fp8(w, per_channel)
    assert w8.dtype == FP8 and w8.shape == w.shape and scale.dtype == torch.float32
    assert scale.shape == (shape[:-1] if per_channel else shape[:-2])
    # The largest magnitude of each scaled group lands on the fp8 maximum.
    amax = w8.float().abs().amax(-1) if per_channel else w8.float().abs().flatten(-2).amax(-1)
    assert torch.all(amax == FP8_MAX)
    deq = dequantize_fp8(w8, scale)
    per_elem_scale = scale[..., None] if per_channel else scale[..., None, None]
    _assert_fp8_error(w, deq, per_elem_scale.expand_as(w))
    assert dequantize_fp8(w8, scale, torch.bfloat16).dtype == torch.bfloat16


def test_quantize_fp8_zero_guard_and_outliers() -> None:
    w = torch.zeros(8, 16)
    w[3, 5] = 1e4  # one outlier row; every other row is all zero
    w8, scale = quantize_fp8(w, per_channel=True)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(dequantize_fp8(w8, scale), w)
    w8, scale = quantize_fp8(torch.zeros(4, 4))
    assert scale.item() == 1.0 and torch.equal(w8.float(), torch.zeros(4, 4))


def test_quantize_act_fp8_dynamic_and_static() -> None:
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1)) * 3
    x[2] = 0  # an all-zero token
    x8, scale = quantize_act_fp8(x)
    assert x8.dtype == FP8 and scale.shape == (5, 1) and scale[2].item() == 1.0
    _assert_fp8_error(x, x8.float() * scale, scale.expand_as(x))
    x8, scale = quantize_act_fp8(x, torch.tensor(0.001))  # static and too small: saturates, no NaN
    assert scale.shape == (5, 1) and torch.isfinite(x8.float()).all()
    assert x8.float().abs().max().item() == FP8_MAX


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_matches_dequantised_matmul(per_channel: bool, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    w8, scale = quantize_fp8(torch.randn(48, 32, generator=gen), per_channel)
    x = torch.randn(3, 32, generator=gen)
    ref = x.double() @ dequantize_fp8(w8, scale).double().t()  # [3, 48]
    out = fp8_linear(x.to(dtype), w8, scale)
    assert out.dtype == dtype and out.shape == (3, 48)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((out.double() - ref).norm() / ref.norm()).item() < tol


def test_row_scales_of_every_stored_shape() -> None:
    for stored in (torch.tensor(0.5), torch.tensor([0.5]), torch.full((4,), 0.5), torch.full((4, 1), 0.5)):
        assert torch.equal(row_scales(stored, 4), torch.full((4,), 0.5))
    with pytest.raises(ValueError, match="does not fit"):
        row_scales(torch.ones(3), 4)


def test_split_fp8_name_hf_and_mistral() -> None:
    assert split_fp8_name("model.layers.0.self_attn.q_proj.weight_scale") == (
        "model.layers.0.self_attn.q_proj.weight", "weight_scale")
    assert split_fp8_name("model.layers.0.self_attn.q_proj.input_scale") == (
        "model.layers.0.self_attn.q_proj.weight", "input_scale")
    assert split_fp8_name("layers.1.feed_forward.experts.2.w3.qscale_weight") == (
        "layers.1.feed_forward.experts.2.w3.weight", "weight_scale")
    assert split_fp8_name("layers.1.attention.wo.qscale_act") == ("layers.1.attention.wo.weight", "input_scale")
    assert split_fp8_name("layers.1.attention.wo.weight") == ("layers.1.attention.wo.weight", "weight")


def test_quantization_configs() -> None:
    assert fp8_config_from_hf({}) is None
    assert fp8_config_from_hf({"quantization_config": {"quant_method": "fp8", "activation_scheme": "static"}}) == \
        Fp8Config("static")
    assert fp8_config_from_hf({"quantization_config": {"quant_method": "fp8"}}) == Fp8Config("dynamic")
    with pytest.raises(ValueError, match="quant_method"):
        fp8_config_from_hf({"quantization_config": {"quant_method": "awq"}})
    with pytest.raises(ValueError, match="weight_block_size"):
        fp8_config_from_hf({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}})
    assert fp8_config_from_mistral({"dim": 8}) is None
    assert fp8_config_from_mistral({"quantization": {"qformat_weight": "fp8_e4m3"}}) == Fp8Config("static")
    assert fp8_config_from_mistral({"quantization": {"qformat_weight": "fp8_e4m3", "qscheme_act": "NO_SCALES"}}) == \
        Fp8Config("dynamic")


def _read_all(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            tensors.update({k: handle.get_tensor(k) for k in handle.keys()})
    return tensors


@pytest.mark.parametrize("scheme", ["dynamic", "static"])
def test_hf_fp8_checkpoint_round_trip(tmp_path: Path, scheme: str) -> None:
    cfg = PRESETS["tiny"]
    out = write_fp8_checkpoint(tmp_path / "fp8", cfg, seed=0, activation_scheme=scheme)
    assert read_fp8_config(out) == Fp8Config(scheme)  # type: ignore[arg-type]
    assert json.loads((out / "config.json").read_text())["hidden_size"] == cfg.hidden_size
    assert (out / "tokenizer.model").is_file()
    tensors = _read_all(out)
    original = random_weights(cfg, seed=0, dtype=torch.bfloat16)
    p = "model.layers.1.block_sparse_moe."
    # Router gate, embeddings, norms and LM head stay as written; projections become fp8.
    for name in (p + "gate.weight", "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert tensors[name].dtype == torch.bfloat16 and torch.equal(tensors[name], original[name])
        assert name.removesuffix(".weight") + ".weight_scale" not in tensors
    for name in ("model.layers.0.self_attn.k_proj.weight", p + "experts.3.w2.weight"):
        assert tensors[name].dtype == FP8
        scale = tensors[name.removesuffix("weight") + "weight_scale"]
        assert scale.shape == () and scale.dtype == torch.float32
        _assert_fp8_error(original[name].float(), dequantize_fp8(tensors[name], scale), scale)
        has_input = name.removesuffix("weight") + "input_scale" in tensors
        assert has_input == (scheme == "static")
    if scheme == "static":
        assert tensors[p + "experts.5.w1.input_scale"].item() == pytest.approx(STATIC_INPUT_SCALE)


@pytest.mark.parametrize("per_channel", [False, True])
def test_loader_holds_each_fp8_part_exactly(tmp_path: Path, per_channel: bool) -> None:
    """w1/w3 and q/k/v share an engine parameter but carry their own scales in the file: kept in
    fp8 (the backends with fp8 kernels) or dequantised at load, every row is what the file holds."""
    src = write_checkpoint(tmp_path / "bf16", PRESETS["tiny"], seed=0, dtype="bfloat16")
    ckpt = convert_checkpoint_to_fp8(src, tmp_path / "fp8", per_channel=per_channel)
    tensors = _read_all(ckpt)
    kept, _ = load_model(ckpt, torch.bfloat16, progress=False, moe_backend="triton")  # only built, never run
    dequantised, _ = load_model(ckpt, torch.float32, progress=False)
    expert = "model.layers.1.block_sparse_moe.experts.5."
    attn = "model.layers.0.self_attn."
    names = [expert + "w1.weight", expert + "w3.weight", *(f"{attn}{x}_proj.weight" for x in "qkv")]
    scales = {n: tensors[n + "_scale"] for n in names}
    assert scales[expert + "w1.weight"].flatten()[0] != scales[expert + "w3.weight"].flatten()[0]
    for name in names:
        w8, rows = tensors[name], row_scales(scales[name], tensors[name].shape[0])  # [N, K], [N]
        assert torch.equal(weight_slot(kept, name).view(torch.uint8), w8.view(torch.uint8))
        assert torch.equal(scale_slot(kept, name), rows)
        assert torch.equal(weight_slot(dequantised, name), dequantize_fp8(w8, rows))


def test_sharded_and_per_channel_fp8_checkpoint(tmp_path: Path) -> None:
    src = write_checkpoint(tmp_path / "bf16", PRESETS["tiny"], shard_mb=2, dtype="bfloat16")
    out = convert_checkpoint_to_fp8(src, tmp_path / "fp8", per_channel=True)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = _read_all(out)
    assert set(index["weight_map"]) == set(tensors)
    for name, fname in index["weight_map"].items():
        assert (out / fname).is_file()
    name = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    assert tensors[name + "_scale"].shape == (PRESETS["tiny"].intermediate_size, 1)
    assert row_scales(tensors[name + "_scale"], tensors[name].shape[0]).shape == (tensors[name].shape[0],)


def test_mistral_fp8_checkpoint(tmp_path: Path) -> None:
    cfg = PRESETS["tiny"]
    out = write_fp8_checkpoint(tmp_path / "fp8", cfg, layout="mistral", activation_scheme="static")
    params = json.loads((out / "params.json").read_text())
    assert params["quantization"] == {"qformat_weight": "fp8_e4m3", "qscheme_act": "TENSOR"}
    assert read_fp8_config(out) == Fp8Config("static")
    tensors = _read_all(out)
    name = hf_to_mistral("model.layers.0.block_sparse_moe.experts.2.w3.weight")
    base = name.removesuffix(".weight")
    assert tensors[name].dtype == FP8 and tensors[base + ".qscale_weight"].shape == ()
    assert base + ".qscale_act" in tensors
    assert tensors[hf_to_mistral("model.layers.0.block_sparse_moe.gate.weight")].dtype == torch.bfloat16
    assert not any(k.endswith((".weight_scale", ".input_scale")) for k in tensors)
