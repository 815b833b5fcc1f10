"""The GPU paths on CPU: the Triton decode-attention kernel against PyTorch over a grid of shapes,
prefix-hit prefill without a dense mask, and the graphed decode step (Triton MoE and attention)
under a guard that fails on any host-synchronising call, all through Triton's interpreter."""

from __future__ import annotations

import importlib
import os

# NOTE: must precede the first import of triton.jit-decorated code (see test_fused_moe_triton.py).
os.environ["TRITON_INTERPRET"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import engine.fused_moe_triton as fmt  # noqa: E402
import engine.paged_attention_triton as pat  # noqa: E402
from engine.attention import AttentionMetadata, PrefillChunk, paged_attention  # noqa: E402
from engine.config import DecodeGraphConfig, EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.model_runner import ModelRunner  # noqa: E402
from engine.moe import fused_moe, make_experts, select_experts  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from tests.host_sync_guard import HostSyncError, NoHostSync  # noqa: E402

for module in (fmt, pat):  # imported earlier without the interpreter: compile them for it now
    if not isinstance(next(v for k, v in vars(module).items() if k.endswith("_kernel")), InterpretedFunction):
        importlib.reload(module)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
               first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """fp32 softmax attention of each row over its visible positions -> [B, H, hd]."""
    group = q.shape[1] // k_cache.shape[1]
    out = []
    for b in range(q.shape[0]):
        s = slots[b, int(first[b]) : int(last[b]) + 1]
        k = k_cache[s].float().repeat_interleave(group, 1)  # [n, H, hd]
        v = v_cache[s].float().repeat_interleave(group, 1)
        scores = torch.einsum("hd,nhd->hn", q[b].float(), k) / q.shape[-1] ** 0.5  # [H, n]
        out.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), v))
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 4, 16), (8, 2, 32), (6, 1, 16), (32, 8, 64)])
@pytest.mark.parametrize("window", [None, 9])
@pytest.mark.parametrize("partition", [None, 16])  # 16: three partitions of the 40 positions, merged
def test_decode_kernel_matches_reference(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int,
                                         window: int | None, partition: int | None) -> None:
    gen = torch.Generator().manual_seed(heads * 100 + head_dim)
    batch, context, slots_total = 3, 40, 200
    q = torch.randn(batch, heads, head_dim, generator=gen).to(dtype)  # [B, H, hd]
    k_cache = torch.randn(slots_total, kv_heads, head_dim, generator=gen).to(dtype)  # [S, KVH, hd]
    v_cache = torch.randn(slots_total, kv_heads, head_dim, generator=gen).to(dtype)
    slots = torch.stack([torch.randperm(slots_total, generator=gen)[:context] for _ in range(batch)])  # [B, L]
    last = torch.tensor([39, 0, 17])  # [B] a full context, a first token, one in between
    first = torch.zeros_like(last) if window is None else (last - window + 1).clamp(min=0)
    out = pat.paged_decode_attention(q, k_cache, v_cache, slots, first, last, partition=partition)
    assert out.dtype == dtype and out.shape == q.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), _reference(q, k_cache, v_cache, slots, first, last), atol=tol, rtol=tol)


def test_prefix_hit_prefill_is_causal_over_the_context_without_a_mask() -> None:
    """A chunk after 12 cached positions: lower-right causal (no mask tensor) equals the dense mask."""
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, hd, cached, n = 8, 2, 16, 12, 5
    k_cache = torch.randn(64, kv_heads, hd, generator=gen)  # [S, KVH, hd]
    v_cache = torch.randn(64, kv_heads, hd, generator=gen)
    ctx = torch.randperm(64, generator=gen)[: cached + n]  # [C]
    q = torch.randn(n, heads, hd, generator=gen)  # [q, H, hd]
    k, v = k_cache[ctx[cached:]], v_cache[ctx[cached:]]

    def run(mask: torch.Tensor | None) -> torch.Tensor:
        meta = AttentionMetadata(ctx[cached:], 0, None, None, [PrefillChunk(0, n, ctx, mask)])
        return paged_attention(q, k, v, k_cache, v_cache, meta)

    dense = torch.arange(cached + n)[None, :] <= torch.arange(cached, cached + n)[:, None]  # [q, C]
    torch.testing.assert_close(run(None), run(dense))
    # And the fresh-prompt case (no context) still attends causally within the chunk only.
    meta = AttentionMetadata(ctx[:n], 0, None, None, [PrefillChunk(0, n, ctx[:n], None)])
    want = F.scaled_dot_product_attention(q.transpose(0, 1), k_cache[ctx[:n]].repeat_interleave(4, 1).transpose(0, 1),
                                          v_cache[ctx[:n]].repeat_interleave(4, 1).transpose(0, 1), is_causal=True)
    torch.testing.assert_close(paged_attention(q, k_cache[ctx[:n]], v_cache[ctx[:n]], k_cache, v_cache, meta),
                               want.transpose(0, 1).flatten(1))


def test_guard_catches_a_host_sync_in_engine_code() -> None:
    """The guard's own check: the per-expert torch MoE path counts tokens on the host (bincount, tolist)."""
    gen = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(4, 32, 16, generator=gen), torch.randn(4, 16, 16, generator=gen)
    x = torch.randn(3, 16, generator=gen)
    weights, ids = select_experts(torch.randn(3, 4, generator=gen), 2)
    with pytest.raises(HostSyncError, match=r"bincount at moe\.py"):
        with NoHostSync():
            fused_moe(x, make_experts(w13, w2), weights, ids)


def _engine(ckpt: Path, graphs: bool) -> LLMEngine:
    engine = LLMEngine(EngineConfig(
        model=str(ckpt), dtype="float32", load_progress=False, cpu_kernels="off", moe_backend="triton",
        attention_backend="triton", cache={"kv_cache_bytes": 4 << 20, "block_size": 4},
        scheduler={"max_num_seqs": 4, "max_num_batched_tokens": 64},
    ))
    if graphs:  # the runner CUDA would use: decode steps padded to buckets, replayed from graphs
        old = engine.runner
        engine.runner = ModelRunner(old.model, old.num_blocks, 4, old.device, old.eos_id,
                                    DecodeGraphConfig(max_batch=4, max_context=32))
    return engine


def _tokens(engine: LLMEngine) -> dict[str, list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    for i in range(3):
        engine.add_request(f"r{i}", [1, 50 + i, 60 + 2 * i, 70], params)
    out: dict[str, list[int]] = {}
    while engine.has_unfinished:
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(t for c in o.choices for t in c.token_ids)
    return out


def test_graphed_decode_step_never_syncs_with_the_host(tiny_checkpoint: Path) -> None:
    """What a CUDA graph would capture (the padded decode forward: Triton MoE, Triton attention)
    runs under the guard; its tokens equal the same kernels' unpadded eager steps."""
    want = _tokens(_engine(tiny_checkpoint, graphs=False))
    engine = _engine(tiny_checkpoint, graphs=True)
    graphs = engine.runner.graphs
    assert graphs is not None
    forward, guarded = graphs.forward, []

    def no_host_sync(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        guarded.append(args[0].shape[0])
        with NoHostSync():
            return forward(*args)

    graphs.forward = no_host_sync
    assert _tokens(engine) == want
    assert guarded and max(guarded) == 4  # decode steps ran through the guarded region, padded to 4
