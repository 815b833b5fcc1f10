"""The AMX expert kernel (engine/amx_kernels.c) against the fp32 reference, its weight packing, and
the "amx" backend in the model against the oneDNN per-expert backend."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams, amx
from engine.attention import AttentionMetadata, paged_attention
from engine.checkpoint import PRESETS
from engine.linear import Linear
from engine.model import resolve_moe_backend
from engine.model_config import ModelConfig
from engine.moe import fused_moe, make_experts
from tests.conftest import CheckpointFactory
from tests.moe_reference import moe_problem, reference_moe, rel_err

pytestmark = pytest.mark.skipif(
    not amx.supports(torch.bfloat16, 64, 32), reason="no AMX CPU or no C compiler here"
)


def _unpack_w13(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_w13, written from its docstring: [E, I/32, D/32, 2, 2, 16, 16, 2] -> [E, 2I, D]."""
    e, p, kc = packed.shape[:3]
    w = packed.permute(0, 3, 1, 4, 6, 2, 5, 7)  # [E, w1|w3, p, half, col, kc, r, j]
    return w.reshape(e, 2 * p * 32, kc * 32)


def test_loading_the_kernel_keeps_subnormals() -> None:
    """Building with -ffast-math must not switch the process to flush-to-zero (crtfastmath.o)."""
    code = "from engine import amx; assert amx._library() is not None; print(5e-324 * 1.0)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout) > 0


def test_packing_puts_every_weight_in_its_tile() -> None:
    e, i, d = 3, 64, 128
    w13 = torch.arange(e * 2 * i * d, dtype=torch.float32).view(e, 2 * i, d)
    packed = amx.pack_w13(w13)
    assert packed.shape == (e, i // 32, d // 32, 2, 2, 16, 16, 2)
    assert torch.equal(_unpack_w13(packed), w13)
    # Tile (p=1, kc=2, w3, second half), K pair r=5, column c=7, j=1 is w3 row 32+16+7, column 64+11.
    assert packed[1, 1, 2, 1, 1, 5, 7, 1] == w13[1, i + 32 + 16 + 7, 2 * 32 + 2 * 5 + 1]
    w2 = torch.arange(e * d * i, dtype=torch.float32).view(e, d, i)
    p2 = amx.pack_panels(w2)
    assert p2.shape == (e, d // 64, i // 32, 4, 16, 16, 2)
    # Panel 1, K chunk 1, sub-tile 2, pair r=3, column 4, j=0: output row 64+32+4, input 32+6.
    assert p2[0, 1, 1, 2, 3, 4, 0] == w2[0, 64 + 32 + 4, 32 + 6]


@pytest.mark.parametrize("num_tokens", [1, 3, 16, 64, 257])
@pytest.mark.parametrize(("num_experts", "top_k"), [(8, 2), (4, 1), (6, 3)])
@pytest.mark.parametrize(("hidden", "inter"), [(128, 256), (192, 96)])
def test_kernel_matches_reference(num_tokens: int, num_experts: int, top_k: int, hidden: int, inter: int) -> None:
    x, w13, w2, weights, ids = moe_problem(num_tokens, num_experts, top_k, hidden, inter, seed=num_tokens + hidden)
    w13, w2, x = w13.bfloat16(), w2.bfloat16(), x.bfloat16()
    out = amx.AmxExperts(w13, w2)(x, weights, ids)  # [T, D]
    assert out.dtype == torch.bfloat16 and out.shape == (num_tokens, hidden)
    ref = reference_moe(x.float(), w13.float(), w2.float(), weights, ids)
    onednn = fused_moe(x, make_experts(w13, w2), weights, ids)
    # fp32 accumulation, one rounding of the SiLU product: at least as close as the oneDNN path.
    assert rel_err(out, ref) < 1e-2
    assert rel_err(out, ref) <= rel_err(onednn, ref) * 1.1 + 1e-3


@pytest.mark.parametrize("tokens_on_one_expert", [15, 16, 17, 33])
def test_tile_boundaries(tokens_on_one_expert: int) -> None:
    """Every token on expert 2 (and expert 0 second): row counts around whole 16-row tiles."""
    x, w13, w2, _, _ = moe_problem(tokens_on_one_expert, 4, 2, 128, 64, seed=1)
    w13, w2, x = w13.bfloat16(), w2.bfloat16(), x.bfloat16()
    ids = torch.tensor([[2, 0]] * tokens_on_one_expert)
    weights = torch.tensor([[0.75, 0.25]] * tokens_on_one_expert)
    out = amx.AmxExperts(w13, w2)(x, weights, ids)
    assert rel_err(out, reference_moe(x.float(), w13.float(), w2.float(), weights, ids)) < 1e-2


def test_threads_do_not_change_results() -> None:
    """Each output element is computed by one thread in a fixed order: bitwise the same."""
    x, w13, w2, weights, ids = moe_problem(40, 8, 2, 128, 256, seed=2)
    experts = amx.AmxExperts(w13.bfloat16(), w2.bfloat16())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = experts(x.bfloat16(), weights, ids)
        torch.set_num_threads(2)
        two = experts(x.bfloat16(), weights, ids)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_backend_resolution() -> None:
    cpu = torch.device("cpu")
    tiny = PRESETS["tiny"]
    assert resolve_moe_backend("auto", cpu, torch.bfloat16, tiny, 1) == "amx"
    assert resolve_moe_backend("auto", cpu, torch.float32, tiny, 1) == "torch"  # the kernel is bf16 only
    assert resolve_moe_backend("auto", torch.device("cuda"), torch.bfloat16, tiny, 1) == "triton"
    odd = ModelConfig(**{**tiny.model_dump(), "hidden_size": 96})
    assert resolve_moe_backend("auto", cpu, torch.bfloat16, odd, 1) == "torch"
    with pytest.raises(ValueError, match="multiple of 64"):
        resolve_moe_backend("amx", cpu, torch.bfloat16, odd, 1)
    assert resolve_moe_backend("torch", cpu, torch.bfloat16, tiny, 1) == "torch"


@pytest.mark.parametrize("m", [0, 1, 4, 16, 17, 257])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_linear_matches_reference(m: int, out_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(m)
    w = (torch.randn(192, 96, generator=gen) * 0.1).bfloat16()  # [N, K]
    x = torch.randn(m, 96, generator=gen).bfloat16()  # [M, K]
    lin = Linear(w)
    assert lin.amx is not None and lin.packed is None and lin.weight.numel() == 0  # only the AMX layout kept
    got = lin.amx(x, out_dtype)
    assert got.shape == (m, 192) and got.dtype == out_dtype
    if m:
        ref = x.float() @ w.float().t()
        assert rel_err(got, ref) < (1e-5 if out_dtype == torch.float32 else 1e-2)
        assert torch.equal(lin(x), got.bfloat16())
    assert Linear(w[:100]).amx is None  # 100 output rows: not whole panels of 64, so oneDNN


@pytest.mark.parametrize("rows", [1, 3, 64])
@pytest.mark.parametrize("dim", [128, 1000])
def test_add_rms_norm_matches_torch(rows: int, dim: int) -> None:
    gen = torch.Generator().manual_seed(rows + dim)
    h = (torch.randn(rows, dim, generator=gen) * 3).bfloat16()
    delta = torch.randn(rows, dim, generator=gen).bfloat16()
    weight = (0.5 + torch.rand(dim, generator=gen)).bfloat16()
    norm = amx.AddRMSNorm(weight, 1e-5)
    want_h = h + delta  # bf16 add, rounded as the kernel rounds it
    want = torch.nn.functional.rms_norm(want_h.float(), (dim,), weight.float(), 1e-5)
    got_plain = norm(want_h.clone())
    stream = h.clone()
    got = norm(stream, delta)
    assert torch.equal(stream, want_h)  # the residual stream updated in place
    for out in (got, got_plain):
        assert out.dtype == torch.bfloat16
        assert (out.float() - want).abs().max() <= want.abs().max() * 2**-8  # one bf16 rounding


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(8, 2, 64), (6, 1, 16), (4, 4, 128)])
@pytest.mark.parametrize("window", [None, 5])
def test_decode_attention_matches_sdpa_path(heads: int, kv_heads: int, head_dim: int, window: int | None) -> None:
    """Sequences of 1 to 40 positions over scattered cache slots: the kernel reading the cache in
    place against paged_attention's gather + SDPA path on the same metadata."""
    gen = torch.Generator().manual_seed(heads + head_dim)
    slots_total, b = 512, 5
    k_cache = torch.randn(slots_total, kv_heads, head_dim, generator=gen).bfloat16()
    v_cache = torch.randn(slots_total, kv_heads, head_dim, generator=gen).bfloat16()
    positions = torch.tensor([0, 3, 17, 39, 25])  # [B] each query's own position
    length = int(positions.max()) + 1
    slots = torch.randperm(slots_total, generator=gen)[: b * length].view(b, length)  # [B, L] distinct slots
    k_pos = torch.arange(length)
    visible = k_pos <= positions[:, None]
    first = torch.zeros_like(positions) if window is None else (positions - window + 1).clamp(min=0)
    visible &= k_pos >= first[:, None]
    q = torch.randn(b, heads, head_dim, generator=gen).bfloat16()
    kv = torch.randn(b, kv_heads, head_dim, generator=gen).bfloat16()  # this step's K/V (written first)
    meta = AttentionMetadata(
        slot_mapping=slots.gather(1, positions[:, None]).squeeze(1), num_decode=b, decode_slots=slots,
        decode_mask=visible[:, None, None, :], prefills=[], decode_first=first, decode_last=positions,
    )
    kernel = amx.DecodeAttention(heads, kv_heads, head_dim)
    want = paged_attention(q, kv, kv, k_cache.clone(), v_cache.clone(), meta)  # [B, H hd]
    got = paged_attention(q, kv, kv, k_cache.clone(), v_cache.clone(), meta, kernel)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, want.float()) < 2e-2


PROMPTS = [[1, 2, 3, 4, 5, 6], [1, *range(300, 340)], [1, *range(900, 905)]]
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1)


def _runs(llm: LLM) -> list[tuple[list[int], list[float]]]:
    return [(r.token_ids, [lp.logprob for lp in r.outputs[0].logprobs]) for r in llm.generate(PROMPTS, GREEDY)]


def _generate(ckpt: Path, backend: str, tp: int = 1) -> tuple[LLM, list[tuple[list[int], list[float]]]]:
    llm = LLM(ckpt, dtype="bfloat16", moe_backend=backend, tensor_parallel_size=tp,
              cache={"kv_cache_bytes": 8 << 20}, load_progress=False)
    return llm, _runs(llm)


def test_amx_backend_in_the_model(make_checkpoint: CheckpointFactory) -> None:
    """bf16 tiny model: the amx backend keeps only packed expert weights and generates what the
    oneDNN backend does (first tokens equal, logprobs within bf16 noise)."""
    ckpt = make_checkpoint(PRESETS["tiny"], dtype="bfloat16")
    llm, amx_runs = _generate(ckpt, "amx")
    model = llm.engine.model
    moe = model.layers[0].moe
    assert moe.amx_experts is not None and moe.w13.numel() == 0 and moe.w2.numel() == 0
    # The same model with the attention and norm kernels switched off: PyTorch's gather + SDPA
    # and F.rms_norm instead.
    assert all(layer.attn.decode_kernel is not None and layer.ffn_norm.kernel is not None for layer in model.layers)
    for layer in model.layers:
        layer.attn.decode_kernel = layer.attn_norm.kernel = layer.ffn_norm.kernel = None
    model.norm.kernel = None
    plain = _runs(llm)
    for (k_ids, k_lp), (p_ids, p_lp) in zip(amx_runs, plain):
        assert k_ids[:3] == p_ids[:3]
        assert max(abs(a - b) for a, b in zip(k_lp[:3], p_lp[:3])) < 0.05
    del llm, model, moe
    _, onednn_runs = _generate(ckpt, "torch")
    for (a_ids, a_lp), (o_ids, o_lp) in zip(amx_runs, onednn_runs):
        assert a_ids[0] == o_ids[0]
        assert abs(a_lp[0] - o_lp[0]) < 0.05
    threads = torch.get_num_threads()
    try:
        llm, tp_runs = _generate(ckpt, "amx", tp=2)  # each rank runs the kernel on its intermediate slice
        llm.engine.shutdown()
    finally:
        torch.set_num_threads(threads)
    assert [ids[0] for ids, _ in tp_runs] == [ids[0] for ids, _ in amx_runs]
