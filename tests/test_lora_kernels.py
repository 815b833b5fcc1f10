"""The LoRA kernels against the plain PyTorch product, and expert LoRA on every MoE backend (the
CPU kernel in bf16 and fp8, Triton under its interpreter) against the torch backend."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from engine import LLM, LoRARequest, SamplingParams
from engine.cpu_kernels import LoRAKernel, available_isas
from engine.lora_adapter import write_random_adapter
from engine.lora_ops import Groups, add_lora_gathered, add_lora_reference
from engine.lora_triton import add_lora_triton
from tests.moe_reference import rel_err


def lora_problem(tokens: int, adapters: int, rank: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    splits, k = (96, 32, 32), 128
    x = torch.randn(tokens, k, generator=gen).to(dtype)  # [T, K]
    a = (torch.randn(adapters, len(splits) * rank, k, generator=gen) / k**0.5).to(dtype)  # [G, 3R, K]
    b = (torch.randn(adapters, rank, sum(splits), generator=gen) / rank**0.5).to(dtype)  # [G, R, N]
    index = torch.randint(-1, adapters, (tokens,), generator=gen)  # [T], -1: no adapter
    out = torch.randn(tokens, sum(splits), generator=gen).to(dtype)  # [T, N]
    return out, x, index, a, b, splits


def plain_lora(out, x, index, a, b, splits) -> torch.Tensor:
    """Row by row in fp32: out + (x @ A_g^T) split per module @ B_g^T."""
    want = out.float().clone()
    rank = b.shape[1]
    for t, g in enumerate(index.tolist()):
        if g < 0:
            continue
        h = x[t].float() @ a[g].float().t()  # [3R]
        start = 0
        for j, size in enumerate(splits):
            want[t, start : start + size] += h[j * rank : (j + 1) * rank] @ b[g, :, start : start + size].float()
            start += size
    return want


KERNEL_ISA = next(iter(available_isas()), None)


@pytest.mark.parametrize(("tokens", "adapters", "rank"), list(itertools.product([1, 5, 33], [1, 4], [4, 16])))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_lora_path_matches_the_plain_product(tokens: int, adapters: int, rank: int, dtype: torch.dtype) -> None:
    out, x, index, a, b, splits = lora_problem(tokens, adapters, rank, dtype, seed=tokens * 31 + rank)
    want = plain_lora(out, x, index, a, b, splits)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    # The gathered path reads rows without an adapter from a last, all-zero group (as the slots hold one).
    a0, b0 = torch.cat([a, torch.zeros_like(a[:1])]), torch.cat([b, torch.zeros_like(b[:1])])
    paths = {
        "segmented": lambda o: add_lora_reference(o, x, Groups(index), a, b, splits),
        "gathered": lambda o: add_lora_gathered(o, x, Groups(index), a0, b0, splits),
        "triton": lambda o: add_lora_triton(o, x, index, a, b, splits, block_n=32, block_k=64),
    }
    if KERNEL_ISA is not None and dtype == torch.bfloat16:
        kernel = LoRAKernel(KERNEL_ISA)
        paths["cpu kernel"] = lambda o: kernel(o, x, index, a, b, splits)
        paths["cpu kernel, fp32 out"] = lambda o: kernel(o, x, index, a, b, splits)
    untouched = index < 0
    for name, path in paths.items():
        got = out.float().clone() if name.endswith("fp32 out") else out.clone()
        path(got)
        assert rel_err(got, want) < tol, name
        assert torch.equal(got[untouched].float(), out[untouched].float()), name


GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
PROMPTS = [[1, 2, 3, 4, 5, 6], [1, *range(300, 340)]]


@pytest.fixture(scope="module")
def adapter(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> LoRARequest:
    return LoRARequest("both", str(write_random_adapter(tiny_checkpoint, tmp_path_factory.mktemp("a") / "both",
                                                        rank=8, seed=5)))


def runs(ckpt: Path, adapter: LoRARequest, **kw: object) -> list[tuple[list[int], list[float]]]:
    llm = LLM(ckpt, cache={"kv_cache_bytes": 8 << 20}, load_progress=False, lora={"max_loras": 1}, **kw)
    return [(r.token_ids, [lp.logprob for lp in r.outputs[0].logprobs])
            for r in llm.generate(PROMPTS, GREEDY, lora_request=[adapter, adapter])]


def test_triton_backend_with_adapters_equals_torch_backend(tiny_checkpoint: Path, adapter: LoRARequest) -> None:
    want = runs(tiny_checkpoint, adapter, dtype="float32", moe_backend="torch")
    got = runs(tiny_checkpoint, adapter, dtype="float32", moe_backend="triton")
    assert [t for t, _ in got] == [t for t, _ in want]
    assert max(abs(x - y) for (_, a), (_, b) in zip(got, want) for x, y in zip(a, b)) < 1e-3


def _block_outputs(ckpt: Path, adapter: LoRARequest, **kw: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer 0's attention and MoE block outputs for fixed inputs, with the adapter on rows 0 and 2."""
    llm = LLM(ckpt, dtype="bfloat16", cache={"kv_cache_bytes": 8 << 20}, load_progress=False,
              lora={"max_loras": 1}, **kw)
    runner = llm.engine.runner
    runner._load_adapters([(0, adapter)])
    assert runner.lora is not None
    lora = runner.lora.step([0, -1, 0, -1, 0], torch.device("cpu"))
    assert lora is not None
    moe = runner.model.layers[0].moe
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(0)).bfloat16()  # [T, D]
    with torch.inference_mode():
        with_lora, _ = moe(x, lora)
        without, _ = moe(x)
    return with_lora, without


@pytest.mark.skipif("avx512" not in available_isas() and "amx" not in available_isas(),
                    reason="the project's CPU kernels need AVX512-BF16 or AMX")
@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_cpu_kernel_expert_lora_equals_torch_backend(make_checkpoint, adapter: LoRARequest,
                                                     quantization: str | None) -> None:
    ckpt = make_checkpoint(dtype="bfloat16")
    kernel, kernel_base = _block_outputs(ckpt, adapter, moe_backend="cpu", quantization=quantization)
    torch_path, torch_base = _block_outputs(ckpt, adapter, moe_backend="torch", quantization=quantization)
    assert rel_err(kernel, torch_path.float()) < 3e-2
    assert rel_err(kernel_base, torch_base.float()) < 3e-2
    # Rows 1 and 3 run no adapter: exactly the base block; rows 0, 2, 4 moved well beyond the tolerance.
    assert torch.equal(kernel[[1, 3]], kernel_base[[1, 3]])
    assert rel_err(kernel[[0, 2, 4]], kernel_base[[0, 2, 4]].float()) > 0.1
