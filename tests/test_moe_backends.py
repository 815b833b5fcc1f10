"""The CPU MoE path (oneDNN matmuls with fused silu / multiply) against the plain reference, and the
Triton backend wired into the model (run by Triton's interpreter here) against the torch backend."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.checkpoint import PRESETS
from engine.linear import Linear, onednn_bf16_available
from engine.moe import fused_moe, make_experts, select_experts
from engine.quant import FP8, convert_checkpoint_to_fp8
from tests.moe_reference import reference_moe

D, INTER = 128, 256
PROMPTS = [[1, 2, 3, 4, 5, 6], [1, *range(300, 340)]]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)


def _problem(num_tokens: int, num_experts: int, top_k: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(num_tokens * 100 + num_experts * 10 + top_k)
    x = torch.randn(num_tokens, D, generator=gen)  # [T, D]
    w13 = torch.randn(num_experts, 2 * INTER, D, generator=gen) * D**-0.5  # [E, 2I, D]
    w2 = torch.randn(num_experts, D, INTER, generator=gen) * INTER**-0.5  # [E, D, I]
    weights, ids = select_experts(torch.randn(num_tokens, num_experts, generator=gen), top_k)  # [T, k]
    return x, w13, w2, weights, ids


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("num_tokens", [1, 3, 16, 64, 257])
@pytest.mark.parametrize(("num_experts", "top_k"), [(8, 2), (4, 1), (6, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_moe_matches_reference(num_tokens: int, num_experts: int, top_k: int, dtype: torch.dtype) -> None:
    x, w13, w2, weights, ids = _problem(num_tokens, num_experts, top_k)
    # The reference gets the weights and inputs rounded to `dtype`, so only the computation differs.
    w13, w2, x = w13.to(dtype), w2.to(dtype), x.to(dtype)
    out = fused_moe(x, make_experts(w13, w2), weights, ids)  # [T, D]
    assert out.dtype == dtype and out.shape == (num_tokens, D)
    ref = reference_moe(x.float(), w13.float(), w2.float(), weights, ids)
    assert _rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.skipif(not onednn_bf16_available(), reason="no oneDNN bf16 kernels on this CPU")
@pytest.mark.parametrize("m", [0, 1, 4, 16])
def test_packed_linear_epilogues(m: int) -> None:
    gen = torch.Generator().manual_seed(m)
    w = (torch.randn(192, 96, generator=gen) * 0.1).bfloat16()  # [N, K]
    x = torch.randn(m, 96, generator=gen).bfloat16()  # [M, K]
    other = torch.randn(m, 192, generator=gen).bfloat16()  # [M, N]
    lin = Linear(w)
    assert lin.packed is not None  # the oneDNN layout is what is under test
    y = x.float() @ w.float().t()  # [M, N]
    for got, want in ((lin(x), y), (lin.silu(x), torch.nn.functional.silu(y)), (lin.times(x, other), y * other.float())):
        assert got.shape == (m, 192) and got.dtype == torch.bfloat16
        if m:
            assert _rel_err(got, want) < 1e-2


def _generate(ckpt: Path, **kw: object) -> tuple[LLM, list[tuple[list[int], list[float]]]]:
    llm = LLM(ckpt, dtype="float32", cache={"kv_cache_bytes": 8 << 20}, load_progress=False, **kw)
    runs = [(r.token_ids, [lp.logprob for lp in r.outputs[0].logprobs]) for r in llm.generate(PROMPTS, GREEDY)]
    return llm, runs


def _max_logprob_diff(a: list[tuple[list[int], list[float]]], b: list[tuple[list[int], list[float]]]) -> float:
    return max(abs(x - y) for (_, la), (_, lb) in zip(a, b) for x, y in zip(la, lb))


def test_triton_backend_equals_torch_backend(tiny_checkpoint: Path) -> None:
    _, torch_runs = _generate(tiny_checkpoint, moe_backend="torch")
    llm, triton_runs = _generate(tiny_checkpoint, moe_backend="triton")
    assert llm.engine.runner.model.layers[0].moe.experts == []  # no per-expert matmuls were built
    assert [t for t, _ in triton_runs] == [t for t, _ in torch_runs]
    assert _max_logprob_diff(triton_runs, torch_runs) < 1e-4


def test_fp8_experts_stay_fp8_with_the_triton_backend(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Online fp8 keeps expert weights in fp8 for the kernel; a pre-quantised checkpoint loads the
    same fp8 weights and scales; and the fp8 kernel tracks the dequantised CPU path."""
    llm, online = _generate(tiny_checkpoint, quantization="fp8", moe_backend="triton")
    moe = llm.engine.runner.model.layers[0].moe
    cfg = PRESETS["tiny"]
    assert moe.w13.dtype == FP8 and moe.w2.dtype == FP8
    assert moe.w13_scale is not None and moe.w2_scale is not None
    assert moe.w13_scale.shape == (cfg.num_local_experts, 2 * cfg.intermediate_size)
    assert moe.w2_scale.shape == (cfg.num_local_experts, cfg.hidden_size)
    assert llm.engine.runner.model.layers[0].attn.qkv.dtype == torch.float32  # dense layers dequantised

    fp8_dir = convert_checkpoint_to_fp8(tiny_checkpoint, tmp_path / "fp8", activation_scheme="dynamic", per_channel=True)
    stored, from_checkpoint = _generate(fp8_dir, moe_backend="triton")
    stored_moe = stored.engine.runner.model.layers[0].moe
    assert stored_moe.w13.dtype == FP8
    assert torch.equal(stored_moe.w13.view(torch.uint8), moe.w13.view(torch.uint8))
    assert torch.equal(stored_moe.w13_scale, moe.w13_scale)
    assert from_checkpoint == online

    _, dequantised = _generate(tiny_checkpoint, quantization="fp8", moe_backend="torch")
    assert [t for t, _ in online] == [t for t, _ in dequantised]
    # The kernel also quantises activations per token (w8a8), the CPU path does not.
    assert _max_logprob_diff(online, dequantised) < 0.15
