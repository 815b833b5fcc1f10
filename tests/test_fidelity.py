"""The engine against Hugging Face transformers' MixtralForCausalLM on the same random checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import MixtralForCausalLM

from engine import LLM, SamplingParams
from engine.checkpoint import PRESETS
from engine.model_config import ModelConfig
from tests.recording import RecordingSampler

_BASE = dict(vocab_size=32000, max_position_embeddings=4096)
SHAPES = {
    "tiny-gqa-8x2": PRESETS["tiny"],
    "mha-4x1": ModelConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
                           rope_theta=10000.0, **_BASE),
    "mqa-6x3-window": ModelConfig(hidden_size=96, intermediate_size=64, num_hidden_layers=3,
                                  num_attention_heads=6, num_key_value_heads=1, head_dim=16,
                                  num_local_experts=6, num_experts_per_tok=3, sliding_window=24, **_BASE),
}
NUM_NEW = 64


def prompts(n: int = 8) -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    lengths = [1, 3, 9, 17, 30, 45, 5, 12][:n]
    return [[1] + torch.randint(3, 32000, (k,), generator=gen).tolist() for k in lengths]


@pytest.fixture(scope="module", params=list(SHAPES))
def shape_case(request: pytest.FixtureRequest, make_checkpoint) -> tuple[str, Path]:
    return request.param, make_checkpoint(SHAPES[request.param])


def test_logits_and_greedy_match_transformers(shape_case: tuple[str, Path]) -> None:
    name, ckpt = shape_case
    llm = LLM(ckpt, dtype="float32", cache={"kv_cache_bytes": 32 * 2**20, "block_size": 8}, load_progress=False)
    recorder = RecordingSampler()
    llm.engine.runner.sampler = recorder
    greedy = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True)
    batch = llm.generate(prompts(), greedy)
    hf = MixtralForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    worst = 0.0
    for prompt, result in zip(prompts(), batch):
        assert len(result.token_ids) == NUM_NEW
        full = torch.tensor([prompt + result.token_ids[:-1]])
        with torch.no_grad():
            ref = hf(full).logits[0, len(prompt) - 1 :]  # [NUM_NEW, V]: prefill, then each decode step
        ours = torch.stack([recorder.logits[(tuple(prompt), i)] for i in range(NUM_NEW)])
        rel = ((ours - ref).abs().max() / ref.abs().max()).item()
        worst = max(worst, rel)
        # Teacher-forced on our own tokens, transformers' argmax is each of our tokens: its greedy
        # decoding would produce exactly this continuation.
        assert ref.argmax(-1).tolist() == result.token_ids, f"{name}: greedy tokens differ from transformers"
    assert worst < 1e-4, f"{name}: fp32 logits differ from transformers by {worst:.2e} (relative)"
    # Each prompt alone decodes exactly as it did inside the batch of 8.
    for prompt, result in zip(prompts(), batch):
        assert llm.generate([prompt], greedy)[0].token_ids == result.token_ids


def test_mistral_layout_generates_hf_tokens(make_checkpoint) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outs = {}
    for layout in ("hf", "mistral"):
        llm = LLM(make_checkpoint(layout=layout), dtype="float32", cache={"kv_cache_bytes": 16 * 2**20},
                  load_progress=False)
        outs[layout] = [r.token_ids for r in llm.generate(prompts(), greedy)]
    assert outs["hf"] == outs["mistral"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_tracks_fp32(make_checkpoint, dtype: str) -> None:
    """Half-precision engines run end to end and stay close to fp32 on the first tokens."""
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    ckpt = make_checkpoint(dtype="bfloat16")
    ref = LLM(ckpt, dtype="float32", cache={"kv_cache_bytes": 16 * 2**20}, load_progress=False)
    half = LLM(ckpt, dtype=dtype, cache={"kv_cache_bytes": 16 * 2**20}, load_progress=False)
    assert half.engine.model.embed.dtype == getattr(torch, dtype)
    a = [r.token_ids[0] for r in ref.generate(prompts(), greedy)]
    b = [r.token_ids[0] for r in half.generate(prompts(), greedy)]
    agree = sum(x == y for x, y in zip(a, b)) / len(a)
    assert agree >= 0.75, f"{dtype} first-token agreement with fp32 only {agree:.0%}"
