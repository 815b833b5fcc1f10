"""The Triton fused-MoE kernel, run by Triton's interpreter on the CPU, against a plain expert loop."""

from __future__ import annotations

import importlib
import os

# NOTE: must precede the first import of triton.jit-decorated code: `triton.jit` decides at
# decoration time whether a kernel is interpreted.
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import engine.fused_moe_triton as fmt  # noqa: E402
from engine.quant import dequantize_fp8, quantize_fp8  # noqa: E402
from tests.moe_reference import moe_problem, reference_moe, rel_err  # noqa: E402

if not isinstance(fmt._grouped_gemm_kernel, InterpretedFunction):  # imported earlier without the interpreter
    fmt = importlib.reload(fmt)

D, INTER = 64, 128


def test_moe_align_block_size() -> None:
    ids = torch.tensor([[2, 0], [2, 1], [0, 2]])  # pairs 0..5 -> experts 2,0,2,1,0,2
    sorted_ids, expert_ids, num_padded = fmt.moe_align_block_size(ids, block_m=4, num_experts=4)
    pad = ids.numel()
    assert num_padded.tolist() == [12]  # experts 0, 1, 2 each padded to one tile; 3 has none
    assert sorted_ids[:12].tolist() == [1, 4, pad, pad, 3, pad, pad, pad, 0, 2, 5, pad]
    assert expert_ids[:3].tolist() == [0, 1, 2]
    assert sorted_ids.numel() % 4 == 0 and sorted_ids.numel() >= 12


@pytest.mark.parametrize("fp8", [False, True])
def test_tile_config_buckets(fp8: bool) -> None:
    """16-bit and fp8 x fp8 dots: the decode buckets take short tiles, larger batches no shorter ones."""
    assert fmt.tile_config(1, fp8)["BLOCK_M"] == 16 and fmt.tile_config(16, fp8)["BLOCK_M"] == 16
    assert fmt.tile_config(17, fp8)["BLOCK_M"] == fmt.tile_config(64, fp8)["BLOCK_M"]
    assert fmt.tile_config(257, fp8)["BLOCK_M"] >= fmt.tile_config(256, fp8)["BLOCK_M"]


# fp32 matches to rounding; fp16/bf16 round the intermediate and the output like the torch path.
_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}


@pytest.mark.parametrize("num_tokens", [1, 3, 16, 64, 257])
@pytest.mark.parametrize("num_experts", [4, 8])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_moe_matches_reference(num_tokens: int, num_experts: int, top_k: int, dtype: torch.dtype) -> None:
    x, w13, w2, weights, ids = moe_problem(num_tokens, num_experts, top_k, D, INTER)
    x, w13, w2 = x.to(dtype), w13.to(dtype), w2.to(dtype)
    out = fmt.fused_moe_triton(x, w13, w2, weights, ids)
    assert out.dtype == dtype and out.shape == (num_tokens, D)
    assert rel_err(out, reference_moe(x, w13, w2, weights, ids)) < _TOL[dtype]


@pytest.mark.parametrize("num_tokens", [1, 16, 257])
def test_fused_moe_bf16_through_fp32_upcast(num_tokens: int) -> None:
    x, w13, w2, weights, ids = moe_problem(num_tokens, 8, 2, D, INTER, seed=1)
    x, w13, w2 = x.bfloat16(), w13.bfloat16(), w2.bfloat16()
    out = fmt.fused_moe_triton(x, w13, w2, weights, ids)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, reference_moe(x, w13, w2, weights, ids)) < _TOL[torch.bfloat16]


def test_explicit_config_and_int32_ids() -> None:
    x, w13, w2, weights, ids = moe_problem(9, 4, 2, D, INTER, seed=2)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=2)  # K loop of 2 steps
    out = fmt.fused_moe_triton(x, w13, w2, weights, ids.int(), config=cfg)
    assert rel_err(out, reference_moe(x, w13, w2, weights, ids)) < _TOL[torch.float32]


@pytest.mark.parametrize(
    ("num_tokens", "dtype"), [(1, torch.bfloat16), (16, torch.float16), (64, torch.float32), (257, torch.bfloat16)]
)
@pytest.mark.parametrize("per_channel", [False, True])
def test_fp8_weights_only(num_tokens: int, dtype: torch.dtype, per_channel: bool) -> None:
    x, w13, w2, weights, ids = moe_problem(num_tokens, 8, 2, D, INTER, seed=3)
    x = x.to(dtype)
    w13_8, s13 = quantize_fp8(w13, per_channel)  # scales [E] or [E, 2I]
    w2_8, s2 = quantize_fp8(w2, per_channel)
    out = fmt.fused_moe_triton(x, w13_8, w2_8, weights, ids, s13, s2, quantize_activations=False)
    assert out.dtype == dtype
    ref = reference_moe(x, dequantize_fp8(w13_8, s13), dequantize_fp8(w2_8, s2), weights, ids)
    assert rel_err(out, ref) < _TOL[dtype]


@pytest.mark.parametrize("num_tokens", [1, 3, 64])
@pytest.mark.parametrize("per_channel", [False, True])
def test_fp8_w8a8_dynamic_per_token(num_tokens: int, per_channel: bool) -> None:
    x, w13, w2, weights, ids = moe_problem(num_tokens, 8, 2, D, INTER, seed=4)
    w13_8, s13 = quantize_fp8(w13, per_channel)
    w2_8, s2 = quantize_fp8(w2, per_channel)
    deq13, deq2 = dequantize_fp8(w13_8, s13), dequantize_fp8(w2_8, s2)
    out = fmt.fused_moe_triton(x, w13_8, w2_8, weights, ids, s13, s2)
    # The same fp8 rounding of both GEMM inputs: left over are rare ties in the intermediate.
    assert rel_err(out, reference_moe(x, deq13, deq2, weights, ids, quantize_acts=True)) < 1e-2
    # And within fp8 accuracy of the unquantised-activation result.
    assert rel_err(out, reference_moe(x, deq13, deq2, weights, ids)) < 0.1


def test_fp8_w8a8_static_scales_and_per_tensor_scalar() -> None:
    x, w13, w2, weights, ids = moe_problem(16, 4, 2, D, INTER, seed=5)
    w13_8, s13 = quantize_fp8(w13.reshape(-1, D))  # one scalar scale for all experts: []
    w13_8 = w13_8.view_as(w13)
    w2_8, s2 = quantize_fp8(w2)  # [E]
    a13, a2 = torch.tensor(x.abs().max().item() / 448), torch.tensor(8.0 / 448)
    out = fmt.fused_moe_triton(x, w13_8, w2_8, weights, ids, s13, s2, a13_scale=a13, a2_scale=a2)
    ref = reference_moe(x, w13_8.float() * s13, dequantize_fp8(w2_8, s2), weights, ids)
    assert rel_err(out, ref) < 0.1
    with pytest.raises(ValueError, match="both"):
        fmt.fused_moe_triton(x, w13_8, w2_8, weights, ids, w13_scale=s13)
