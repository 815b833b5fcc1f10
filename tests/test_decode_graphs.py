"""Decode steps through the bucketed static path of engine/decode_graphs.py.

On CUDA the path replays captured graphs; here, on a CPU, the same padded static buffers run
eagerly. What these tests pin down is everything but the capture itself: bucket choice, padding
rows that never touch a sequence's cache, the fallback to the eager path, and outputs equal to
the unpadded engine's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.checkpoint import PRESETS
from engine.config import DecodeGraphConfig, EngineConfig
from engine.decode_graphs import batch_buckets, context_buckets
from engine.llm_engine import LLMEngine
from engine.model_config import ModelConfig
from engine.model_runner import ModelRunner
from engine.sampling_params import SamplingParams
from tests.conftest import CheckpointFactory

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WINDOWED = ModelConfig(
    vocab_size=32000, max_position_embeddings=4096, hidden_size=96, intermediate_size=64, num_hidden_layers=3,
    num_attention_heads=6, num_key_value_heads=1, head_dim=16, num_local_experts=6, num_experts_per_tok=3,
    sliding_window=24,
)
BLOCK = 4


def test_buckets() -> None:
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert batch_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert batch_buckets(1) == [1]
    assert context_buckets(8192, 16) == [256, 512, 1024, 2048, 4096, 8192]
    assert context_buckets(1000, 16) == [256, 512, 1008]  # the last bucket rounded up to whole blocks
    assert context_buckets(40, 16) == [48]
    assert context_buckets(300, 100) == [300]


def _engine(ckpt: Path, graphs: DecodeGraphConfig | None) -> LLMEngine:
    engine = LLMEngine(
        EngineConfig(
            model=str(ckpt), dtype="float32", load_progress=False,
            cache={"kv_cache_bytes": 8 << 20, "block_size": BLOCK},
            scheduler={"max_num_seqs": 16, "max_num_batched_tokens": 64},
        )
    )
    if graphs is not None:  # the same model, behind a runner that pads decode steps to buckets
        old = engine.runner
        engine.runner = ModelRunner(old.model, old.num_blocks, BLOCK, old.device, old.eos_id, graphs)
    return engine


def _generate(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> dict[str, tuple[list[int], list[float]]]:
    """Greedy; request i stops after max_tokens - 3 i tokens, so the batch drains step by step."""
    for i, p in enumerate(prompts):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens - 3 * i, ignore_eos=True, logprobs=0)
        engine.add_request(f"r{i}", p, params)
    out: dict[str, tuple[list[int], list[float]]] = {}
    while engine.has_unfinished:
        for o in engine.step():
            for c in o.choices:
                ids, lps = out.setdefault(o.request_id, ([], []))
                ids.extend(c.token_ids)
                lps.extend(lp.logprob for lp in c.logprobs or [])
    return out


def _prompts(n: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 30, (n,), generator=gen).tolist()
    return [torch.randint(3, 32000, (k,), generator=gen).tolist() for k in lengths]


@pytest.mark.parametrize("shape", ["tiny", "windowed"])
def test_padded_decode_equals_eager(make_checkpoint: CheckpointFactory, shape: str) -> None:
    """11 prompts (batch bucket 16: 5 padding rows, then more as requests finish), contexts past the buckets."""
    ckpt = make_checkpoint(PRESETS["tiny"] if shape == "tiny" else WINDOWED)
    prompts = _prompts(11, seed=3)
    eager = _engine(ckpt, None)
    want = _generate(eager, prompts, 40)
    padded = _engine(ckpt, DecodeGraphConfig(max_batch=16, max_context=48))
    got = _generate(padded, prompts, 40)
    graphs = padded.runner.graphs
    assert graphs is not None
    assert graphs.bucket(11, 30) == (16, 48) and graphs.bucket(11, 49) is None
    used = set(graphs._buckets)
    assert (16, 48) in used and any(b < 16 for b, _ in used), used  # full and draining batches padded
    assert graphs.captured == 0  # nothing is captured on a CPU
    for rid, (ids, lps) in want.items():
        assert got[rid][0] == ids, rid
        assert max(abs(a - b) for a, b in zip(got[rid][1], lps)) < 1e-4, rid
    # Padding wrote only into the pad block, which the block manager never hands out.
    runner = padded.runner
    assert runner.pad_block == padded.blocks.num_blocks == eager.blocks.num_blocks
    real = runner.num_blocks * BLOCK
    assert torch.allclose(runner.kv_caches[:, :, :real], eager.runner.kv_caches[:, :, :real], atol=1e-5)
    assert padded.blocks.num_used_blocks == 0


def test_steps_past_the_buckets_run_eagerly(tiny_checkpoint: Path) -> None:
    """Prompts longer than every context bucket and a batch over the largest batch bucket."""
    prompts = _prompts(6, seed=5)
    want = _generate(_engine(tiny_checkpoint, None), prompts, 30)
    engine = _engine(tiny_checkpoint, DecodeGraphConfig(max_batch=4, max_context=8))
    got = _generate(engine, prompts, 30)
    assert engine.runner.graphs is not None
    assert {k for k in engine.runner.graphs._buckets} <= {(b, 8) for b in (1, 2, 4)}
    assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in want.items()}
