"""The CPU kernels (engine/cpu_kernels.c) in each build this machine runs (AMX, AVX512-BF16), for
bf16 and fp8 weights, against fp32 references; their weight packing; and the "cpu" backend in the
model against the oneDNN per-expert backend."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams, cpu_kernels
from engine.attention import AttentionMetadata, paged_attention, write_kv
from engine.checkpoint import PRESETS
from engine.linear import Linear
from engine.model import Rotary, apply_rotary
from engine.moe import resolve_moe_backend
from engine.model_config import ModelConfig
from engine.moe import fused_moe, make_experts, select_experts
from engine.quant import FP8, dequantize_fp8, quantize_fp8
from tests.conftest import CheckpointFactory
from tests.moe_reference import moe_problem, reference_moe, rel_err

ISAS = [
    pytest.param(isa, marks=pytest.mark.skipif(isa not in cpu_kernels.available_isas(), reason=f"this CPU lacks {isa}"))
    for isa in ("amx", "avx512")
]
# Row counts around the kernel's paths: fp8 widened in registers (<= 4 rows) or a chunk at a time,
# register blocks of 6 rows, AMX tiles of 16.
TOKENS = [1, 3, 4, 5, 16, 64, 257]


def _fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_fp8(w, per_channel=True)


def _unpack_w13(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_w13, written from its docstring: [E, I/32, D/32, 2, 2, 16, 16, 2] -> [E, 2I, D]."""
    e, p, kc = packed.shape[:3]
    w = packed.permute(0, 3, 1, 4, 6, 2, 5, 7)  # [E, w1|w3, p, half, col, kc, r, j]
    return w.reshape(e, 2 * p * 32, kc * 32)


@pytest.mark.parametrize("isa", ISAS)
def test_loading_the_kernel_keeps_subnormals(isa: str) -> None:
    """Building with -ffast-math must not switch the process to flush-to-zero (crtfastmath.o)."""
    code = f"from engine import cpu_kernels; assert cpu_kernels._library({isa!r}) is not None; print(5e-324 * 1.0)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout) > 0


def test_packing_puts_every_weight_in_its_tile() -> None:
    e, i, d = 3, 64, 128
    w13 = torch.arange(e * 2 * i * d, dtype=torch.float32).view(e, 2 * i, d)
    packed = cpu_kernels.pack_w13(w13)
    assert packed.shape == (e, i // 32, d // 32, 2, 2, 16, 16, 2)
    assert torch.equal(_unpack_w13(packed), w13)
    # Tile (p=1, kc=2, w3, second half), K pair r=5, column c=7, j=1 is w3 row 32+16+7, column 64+11.
    assert packed[1, 1, 2, 1, 1, 5, 7, 1] == w13[1, i + 32 + 16 + 7, 2 * 32 + 2 * 5 + 1]
    w2 = torch.arange(e * d * i, dtype=torch.float32).view(e, d, i)
    p2 = cpu_kernels.pack_panels(w2)
    assert p2.shape == (e, d // 64, i // 32, 4, 16, 16, 2)
    # Panel 1, K chunk 1, sub-tile 2, pair r=3, column 4, j=0: output row 64+32+4, input 32+6.
    assert p2[0, 1, 1, 2, 3, 4, 0] == w2[0, 64 + 32 + 4, 32 + 6]
    scales = torch.arange(e * 2 * i, dtype=torch.float32).view(e, 2 * i)
    ps = cpu_kernels.pack_w13_scales(scales)  # [E, I/32, 64]: panel p's 32 w1 columns, then its 32 w3
    assert ps.shape == (e, i // 32, 64)
    assert ps[2, 1, 5] == scales[2, 32 + 5] and ps[2, 1, 32 + 5] == scales[2, i + 32 + 5]


def test_fp8_interleave_order() -> None:
    """Per K pair, 128 bytes: tiles 0 and 1 interleaved 8 by 8, then tiles 2 and 3."""
    tiles = torch.arange(2 * 4 * 16 * 32, dtype=torch.int64).view(2, 4, 16, 16, 2)  # [chunk, tile, r, col, j]
    out = cpu_kernels.interleave_fp8(tiles).view(2, 16, 128)  # [chunk, r, bytes]
    row = out[1, 3]  # chunk 1, K pair 3
    t = tiles[1, :, 3].reshape(4, 32)  # [tile, 32 weights of this pair]
    assert torch.equal(row[:8], t[0, :8]) and torch.equal(row[8:16], t[1, :8])
    assert torch.equal(row[16:24], t[0, 8:16]) and torch.equal(row[56:64], t[1, 24:32])
    assert torch.equal(row[64:72], t[2, :8]) and torch.equal(row[120:128], t[3, 24:32])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rows", [2, 64])
def test_fp8_widening_is_exact_for_every_code(isa: str, rows: int) -> None:
    """Every e4m3 code (subnormals, zeros and both signs; not NaN) widens to its exact value, in
    registers (2 rows) and a chunk at a time (64 rows): one-hot rows read weight columns back."""
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]  # 254 numbers
    k = 256
    gen = torch.Generator().manual_seed(rows)
    w8 = codes[torch.randint(0, codes.numel(), (64, k), generator=gen)]  # [N, K]
    w8[:, :254] = codes  # every code in every row
    scale = torch.full((64,), 2.0**-3)  # a power of two: the product stays exact
    lin = cpu_kernels.CpuLinear(isa, w8.view(FP8), scale)
    picks = torch.randperm(k, generator=gen)[:rows]
    x = torch.nn.functional.one_hot(picks, k).bfloat16()  # [M, K]
    got = lin(x, torch.float32)  # [M, N]
    want = (w8.view(FP8).float() * scale[:, None]).t()[picks]  # [M, N]
    assert torch.equal(got, want)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize(("num_experts", "top_k"), [(8, 2), (4, 1), (6, 3)])
@pytest.mark.parametrize(("hidden", "inter"), [(128, 256), (192, 96)])
def test_kernel_matches_reference(isa: str, num_tokens: int, num_experts: int, top_k: int, hidden: int,
                                  inter: int) -> None:
    x, w13, w2, weights, ids = moe_problem(num_tokens, num_experts, top_k, hidden, inter, seed=num_tokens + hidden)
    w13, w2, x = w13.bfloat16(), w2.bfloat16(), x.bfloat16()
    out = cpu_kernels.CpuExperts(isa, w13, w2)(x, weights, ids)  # [T, D]
    assert out.dtype == torch.bfloat16 and out.shape == (num_tokens, hidden)
    ref = reference_moe(x.float(), w13.float(), w2.float(), weights, ids)
    onednn = fused_moe(x, make_experts(w13, w2), weights, ids)
    # fp32 accumulation, one rounding of the SiLU product: at least as close as the oneDNN path.
    assert rel_err(out, ref) < 1e-2
    assert rel_err(out, ref) <= rel_err(onednn, ref) * 1.1 + 1e-3


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize(("num_experts", "top_k"), [(8, 2), (4, 1)])
@pytest.mark.parametrize(("hidden", "inter"), [(128, 256), (192, 96)])
def test_fp8_kernel_matches_reference(isa: str, num_tokens: int, num_experts: int, top_k: int, hidden: int,
                                      inter: int) -> None:
    """fp8 experts against the fp32 reference over the same dequantised weights: only bf16
    activations and the bf16 SiLU product separate them."""
    x, w13, w2, weights, ids = moe_problem(num_tokens, num_experts, top_k, hidden, inter, seed=num_tokens + 7)
    (q13, s13), (q2, s2) = _fp8(w13), _fp8(w2)
    x = x.bfloat16()
    out = cpu_kernels.CpuExperts(isa, q13, q2, s13, s2)(x, weights, ids)
    ref = reference_moe(x.float(), dequantize_fp8(q13, s13), dequantize_fp8(q2, s2), weights, ids)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("tokens_on_one_expert", [4, 5, 15, 16, 17, 33])
@pytest.mark.parametrize("fp8", [False, True])
def test_tile_boundaries(isa: str, tokens_on_one_expert: int, fp8: bool) -> None:
    """Every token on expert 2 (and expert 0 second): row counts around register blocks and tiles."""
    x, w13, w2, _, _ = moe_problem(tokens_on_one_expert, 4, 2, 128, 64, seed=1)
    ids = torch.tensor([[2, 0]] * tokens_on_one_expert)
    weights = torch.tensor([[0.75, 0.25]] * tokens_on_one_expert)
    if fp8:
        (q13, s13), (q2, s2) = _fp8(w13), _fp8(w2)
        experts = cpu_kernels.CpuExperts(isa, q13, q2, s13, s2)
        w13, w2 = dequantize_fp8(q13, s13), dequantize_fp8(q2, s2)
    else:
        w13, w2 = w13.bfloat16(), w2.bfloat16()
        experts = cpu_kernels.CpuExperts(isa, w13, w2)
    out = experts(x.bfloat16(), weights, ids)
    assert rel_err(out, reference_moe(x.bfloat16().float(), w13.float(), w2.float(), weights, ids)) < 1e-2


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fp8", [False, True])
def test_threads_do_not_change_results(isa: str, fp8: bool) -> None:
    """Each output element is computed by one thread in a fixed order: bitwise the same."""
    x, w13, w2, weights, ids = moe_problem(40, 8, 2, 128, 256, seed=2)
    if fp8:
        (q13, s13), (q2, s2) = _fp8(w13), _fp8(w2)
        experts = cpu_kernels.CpuExperts(isa, q13, q2, s13, s2)
    else:
        experts = cpu_kernels.CpuExperts(isa, w13.bfloat16(), w2.bfloat16())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = experts(x.bfloat16(), weights, ids)
        torch.set_num_threads(2)
        two = experts(x.bfloat16(), weights, ids)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize("isa", ISAS)
def test_a_team_smaller_than_planned_leaves_no_task_undone(isa: str) -> None:
    """Threads claim the tasks of a share whose thread never ran (as they do those of a thread the
    OS took off its core): with OpenMP capped at one thread, calls planned for four give the one-thread
    results bit for bit (a thread keeping to its own share would leave three quarters unwritten)."""
    code = f"""
import torch
from engine import cpu_kernels
from tests.moe_reference import moe_problem
x, w13, w2, weights, ids = moe_problem(40, 8, 2, 128, 256, seed=3)
experts = cpu_kernels.CpuExperts({isa!r}, w13.bfloat16(), w2.bfloat16())
linear = cpu_kernels.CpuLinear({isa!r}, torch.randn(2048, 512).bfloat16())
h = torch.randn(40, 512).bfloat16()
torch.set_num_threads(1)
one = experts(x.bfloat16(), weights, ids), linear(h, torch.bfloat16)
torch.set_num_threads(4)  # the calls plan four shares; OMP_THREAD_LIMIT runs them on one thread
four = experts(x.bfloat16(), weights, ids), linear(h, torch.bfloat16)
print(all(torch.equal(a, b) for a, b in zip(one, four)), not any(torch.equal(a, torch.zeros_like(a)) for a in one))
"""
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=Path(__file__).parent.parent)
    assert out.stdout.split() == ["True", "True"], out.stderr


def test_backend_resolution() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    tiny = PRESETS["tiny"]
    isas = cpu_kernels.available_isas()
    assert cpu_kernels.resolve_isa("auto", cpu, torch.bfloat16) == (isas[0] if isas else None)
    assert cpu_kernels.resolve_isa("auto", cpu, torch.float32) is None  # the kernels are bf16 only
    assert cpu_kernels.resolve_isa("off", cpu, torch.bfloat16) is None
    assert cpu_kernels.resolve_isa("auto", cuda, torch.bfloat16) is None
    for isa in ("amx", "avx512"):
        if isa in isas:
            assert cpu_kernels.resolve_isa(isa, cpu, torch.bfloat16) == isa
            with pytest.raises(ValueError, match="bfloat16"):
                cpu_kernels.resolve_isa(isa, cpu, torch.float32)
        else:
            with pytest.raises(ValueError, match="does not run here"):
                cpu_kernels.resolve_isa(isa, cpu, torch.bfloat16)
    assert resolve_moe_backend("auto", cuda, None, tiny, 1) == "triton"
    assert resolve_moe_backend("auto", cpu, None, tiny, 1) == "torch"
    assert resolve_moe_backend("auto", cpu, "avx512", tiny, 1) == "cpu"
    odd = ModelConfig(**{**tiny.model_dump(), "hidden_size": 96})
    assert resolve_moe_backend("auto", cpu, "avx512", odd, 1) == "torch"
    with pytest.raises(ValueError, match="multiples of 64"):
        resolve_moe_backend("cpu", cpu, "avx512", odd, 1)
    with pytest.raises(ValueError, match="needs the CPU kernels"):
        resolve_moe_backend("cpu", cpu, None, tiny, 1)
    assert resolve_moe_backend("torch", cpu, "avx512", tiny, 1) == "torch"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", [0, 1, 4, 5, 16, 17, 257])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fp8", [False, True])
def test_linear_matches_reference(isa: str, m: int, out_dtype: torch.dtype, fp8: bool) -> None:
    gen = torch.Generator().manual_seed(m)
    w = torch.randn(192, 96, generator=gen) * 0.1  # [N, K]
    x = torch.randn(m, 96, generator=gen).bfloat16()  # [M, K]
    if fp8:
        w8, scale = _fp8(w)
        lin, dense = Linear(w8, scale, isa=isa), dequantize_fp8(w8, scale)
    else:
        lin, dense = Linear(w.bfloat16(), isa=isa), w.bfloat16().float()
    assert lin.kernel is not None and lin.packed is None and lin.weight.numel() == 0  # only the kernel's layout kept
    got = lin.kernel(x, out_dtype)
    assert got.shape == (m, 192) and got.dtype == out_dtype
    if m:
        ref = x.float() @ dense.t()
        assert rel_err(got, ref) < (1e-5 if out_dtype == torch.float32 else 1e-2)
        assert torch.equal(lin(x), got.bfloat16())
    assert Linear(w[:100].bfloat16(), isa=isa).kernel is None  # 100 output rows: not whole panels of 64, so oneDNN


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rows", [1, 3, 64])
@pytest.mark.parametrize("dim", [128, 1000])
def test_add_rms_norm_matches_torch(isa: str, rows: int, dim: int) -> None:
    gen = torch.Generator().manual_seed(rows + dim)
    h = (torch.randn(rows, dim, generator=gen) * 3).bfloat16()
    delta = torch.randn(rows, dim, generator=gen).bfloat16()
    weight = (0.5 + torch.rand(dim, generator=gen)).bfloat16()
    norm = cpu_kernels.AddRMSNorm(isa, weight, 1e-5)
    want_h = h + delta  # bf16 add, rounded as the kernel rounds it
    want = torch.nn.functional.rms_norm(want_h.float(), (dim,), weight.float(), 1e-5)
    got_plain = norm(want_h.clone())
    stream = h.clone()
    got = norm(stream, delta)
    assert torch.equal(stream, want_h)  # the residual stream updated in place
    for out in (got, got_plain):
        assert out.dtype == torch.bfloat16
        assert (out.float() - want).abs().max() <= want.abs().max() * 2**-8  # one bf16 rounding


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(8, 2, 64), (6, 1, 16), (4, 4, 128), (16, 2, 256)])
@pytest.mark.parametrize("window", [None, 5])
def test_decode_attention_matches_sdpa_path(isa: str, heads: int, kv_heads: int, head_dim: int,
                                            window: int | None) -> None:
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
    kernel = cpu_kernels.DecodeAttention(isa, heads, kv_heads, head_dim)
    write_kv(kv, kv, k_cache, v_cache, meta.slot_mapping)
    want = paged_attention(q, kv, kv, k_cache, v_cache, meta)  # [B, H hd]
    got = paged_attention(q, kv, kv, k_cache, v_cache, meta, kernel)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, want.float()) < 2e-2


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("tokens", [1, 5, 40])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(8, 2, 64), (4, 4, 32)])
def test_rope_and_cache_matches_torch(isa: str, tokens: int, heads: int, kv_heads: int, head_dim: int) -> None:
    """Rotated q and k in place, K/V in their slots: as apply_rotary (in fp32) and write_kv."""
    gen = torch.Generator().manual_seed(tokens + heads)
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, generator=gen).bfloat16()
    rotary = Rotary(head_dim, 4096, 1e6, torch.bfloat16)
    cos, sin = rotary.tables(torch.randint(0, 4096, (tokens,), generator=gen))  # [T, 1, hd]
    slots = torch.randperm(64, generator=gen)[:tokens]
    k_cache, v_cache = (torch.zeros(64, kv_heads, head_dim, dtype=torch.bfloat16) for _ in range(2))
    want_qk = apply_rotary(qkv[:, : heads + kv_heads].float(), cos.float(), sin.float())  # [T, H + KVH, hd]
    want_v = qkv[:, heads + kv_heads :].clone()
    cpu_kernels.RopeAndCache(isa, heads, kv_heads, head_dim)(qkv, cos, sin, slots, k_cache, v_cache)
    assert (qkv[:, : heads + kv_heads].float() - want_qk).abs().max() <= want_qk.abs().max() * 2**-8
    assert torch.equal(k_cache[slots], qkv[:, heads : heads + kv_heads])
    assert torch.equal(v_cache[slots], want_v) and torch.equal(qkv[:, heads + kv_heads :], want_v)
    untouched = torch.ones(64, dtype=torch.bool)
    untouched[slots] = False
    assert not k_cache[untouched].any() and not v_cache[untouched].any()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("tokens", [1, 7, 100])
@pytest.mark.parametrize(("num_experts", "top_k"), [(8, 2), (4, 1), (6, 3)])
def test_router_matches_select_experts(isa: str, tokens: int, num_experts: int, top_k: int) -> None:
    gen = torch.Generator().manual_seed(tokens * num_experts)
    x = torch.randn(tokens, 128, generator=gen).bfloat16()
    gate = torch.randn(num_experts, 128, generator=gen) / 8
    weights, ids = cpu_kernels.Router(isa, gate, top_k)(x)
    want_w, want_ids = select_experts(x.float() @ gate.t(), top_k)
    assert ids.dtype == torch.int64 and torch.equal(ids, want_ids)
    assert torch.allclose(weights, want_w, atol=1e-6)
    tie = torch.zeros(2, 128, dtype=torch.bfloat16)  # every logit equal: the lowest experts win
    assert cpu_kernels.Router(isa, gate, top_k)(tie)[1].tolist() == [list(range(top_k))] * 2
    nan = torch.full((3, 128), float("nan"), dtype=torch.bfloat16)  # a corrupt model's hidden states
    nan_ids = cpu_kernels.Router(isa, gate, top_k)(nan)[1]  # [3, k]
    assert all(sorted(set(row)) == sorted(row) for row in nan_ids.tolist())  # k distinct experts
    assert nan_ids.min() >= 0 and nan_ids.max() < num_experts


PROMPTS = [[1, 2, 3, 4, 5, 6], [1, *range(300, 340)], [1, *range(900, 905)]]
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1)


def _runs(llm: LLM) -> list[tuple[list[int], list[float]]]:
    return [(r.token_ids, [lp.logprob for lp in r.outputs[0].logprobs]) for r in llm.generate(PROMPTS, GREEDY)]


def _generate(ckpt: Path, backend: str, isa: str, tp: int = 1, **kw: object) -> tuple[LLM, list[tuple[list[int], list[float]]]]:
    llm = LLM(ckpt, dtype="bfloat16", moe_backend=backend, cpu_kernels=isa, tensor_parallel_size=tp,
              cache={"kv_cache_bytes": 8 << 20}, load_progress=False, **kw)
    return llm, _runs(llm)


def _tp2(ckpt: Path, backend: str, isa: str, **kw: object) -> list[tuple[list[int], list[float]]]:
    threads = torch.get_num_threads()
    try:
        llm, runs = _generate(ckpt, backend, isa, tp=2, **kw)  # each rank runs the kernel on its slices
        llm.engine.shutdown()
    finally:
        torch.set_num_threads(threads)
    return runs


def _deviation(runs: list[tuple[list[int], list[float]]], ref: list[tuple[list[int], list[float]]], tokens: int) -> float:
    """Largest logprob difference over the first `tokens` tokens, which must be the same tokens."""
    for (ids, _), (ref_ids, _) in zip(runs, ref):
        assert ids[:tokens] == ref_ids[:tokens]
    return max(abs(x - y) for (_, lp), (_, ref_lp) in zip(runs, ref) for x, y in zip(lp[:tokens], ref_lp[:tokens]))


@pytest.mark.parametrize("isa", ISAS)
def test_cpu_backend_in_the_model(isa: str, make_checkpoint: CheckpointFactory) -> None:
    """bf16 tiny model: the cpu backend keeps only packed expert weights and generates the fp32
    model's first tokens, its logprobs at least about as close to fp32's as the PyTorch and
    oneDNN bf16 paths' (fp32 inside the kernels, fewer bf16 roundings; bf16 noise either way)."""
    ckpt = make_checkpoint(PRESETS["tiny"], dtype="bfloat16")
    fp32 = LLM(ckpt, dtype="float32", cache={"kv_cache_bytes": 8 << 20}, load_progress=False)
    ref = _runs(fp32)
    del fp32
    llm, kernel_runs = _generate(ckpt, "cpu", isa)
    model = llm.engine.model
    moe = model.layers[0].moe
    assert moe.cpu_experts is not None and moe.w13.numel() == 0 and moe.w2.numel() == 0
    # The same model with the attention, rotary, routing and norm kernels switched off: PyTorch's
    # ops (gather + SDPA, apply_rotary + index_copy_, select_experts, F.rms_norm) instead.
    kernels = ("decode_kernel", "rope_kernel")
    assert all(getattr(layer.attn, k) is not None for layer in model.layers for k in kernels)
    assert all(layer.moe.router is not None and layer.ffn_norm.kernel is not None for layer in model.layers)
    for layer in model.layers:
        layer.attn.decode_kernel = layer.attn.rope_kernel = layer.moe.router = None
        layer.attn_norm.kernel = layer.ffn_norm.kernel = None
    model.norm.kernel = None
    torch_ops = _runs(llm)
    del llm, model, moe
    _, onednn_runs = _generate(ckpt, "torch", "off")
    kernel_dev = _deviation(kernel_runs, ref, 3)
    assert kernel_dev <= 1.25 * max(_deviation(torch_ops, ref, 3), _deviation(onednn_runs, ref, 3))
    assert kernel_dev < 0.15
    assert [ids[0] for ids, _ in _tp2(ckpt, "cpu", isa)] == [ids[0] for ids, _ in kernel_runs]


@pytest.mark.parametrize("isa", ISAS)
def test_fp8_stays_fp8_on_the_cpu_backend(isa: str, make_checkpoint: CheckpointFactory) -> None:
    """quantization="fp8" on the cpu backend: expert and attention weights held as fp8 bytes with
    per-row scales, generating what the same fp8 weights dequantised to bf16 on oneDNN generate;
    TP=2 gives the same tokens."""
    ckpt = make_checkpoint(PRESETS["tiny"], dtype="bfloat16")
    llm, fp8_runs = _generate(ckpt, "cpu", isa, quantization="fp8")
    layer = llm.engine.model.layers[0]
    experts, qkv = layer.moe.cpu_experts, layer.attn.qkv_proj
    assert experts is not None and experts.w13.dtype == torch.uint8 and experts.w13_scale is not None
    assert qkv is not None and qkv.kernel is not None and qkv.kernel.packed.dtype == torch.uint8
    assert llm.engine.model.lm_head_proj.kernel.packed.dtype == torch.bfloat16  # the LM head stays
    del llm, layer, experts, qkv
    _, dequantised = _generate(ckpt, "torch", "off", quantization="fp8")
    assert _deviation(fp8_runs, dequantised, 2) < 0.05  # the same fp8 weights, bf16 noise apart
    _, bf16_runs = _generate(ckpt, "cpu", isa)
    assert fp8_runs != bf16_runs  # fp8 really changed the model
    assert [ids[:2] for ids, _ in _tp2(ckpt, "cpu", isa, quantization="fp8")] == [ids[:2] for ids, _ in fp8_runs]
