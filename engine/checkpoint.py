"""Random-weight Mixtral checkpoints in the real on-disk layouts (tests, the embedded default, benchmarks).

Weights come from one seeded generator in a fixed order, so the same seed gives the same model
in either layout and identical files on every run.
"""

from __future__ import annotations

import json
import math
import shutil
from importlib import resources
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from engine.model_config import ModelConfig
from engine.weight_names import hf_tensor_shapes, hf_to_mistral, permute_hf_to_mistral, rotary_heads

Layout = Literal["hf", "mistral"]

_SHAPE = dict(vocab_size=32000, rope_theta=1e6, rms_norm_eps=1e-5)
PRESETS: dict[str, ModelConfig] = {
    # The embedded default: starts in about a second, still a real Mixtral (8 experts, top-2, GQA).
    "tiny": ModelConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=4096, **_SHAPE,
    ),
    # ~0.8 B parameters: the shape every speed figure in this project is measured on.
    "bench": ModelConfig(
        hidden_size=1024, intermediate_size=3584, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=4, head_dim=64, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=32768, **_SHAPE,
    ),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def shipped_tokenizer(vocab_size: int) -> Path:
    """Mistral's own SentencePiece files, shipped inside the mistral-common package."""
    names = {32000: "tokenizer.model.v1", 32768: "mistral_instruct_tokenizer_240323.model.v3"}
    if vocab_size not in names:
        raise ValueError(f"no shipped Mistral tokenizer has a vocabulary of {vocab_size}")
    path = resources.files("mistral_common") / "data" / names[vocab_size]
    return Path(str(path))


def random_weights(cfg: ModelConfig, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Hugging Face-named random weights.

    NOTE: initialised as trained transformers are shaped, not as i.i.d. noise: output
    projections (o_proj, w2) scaled by 1/sqrt(2 * layers) keep the residual stream stable
    (GPT-2's scheme), so the random model is not chaotic and small numeric changes (bf16,
    fp8) move its outputs about as much as they move a real model's; the LM head is scaled so
    logits spread over several units and greedy decoding has clear winners.
    """
    gen = torch.Generator().manual_seed(seed)
    residual_scale = 1.0 / math.sqrt(2 * cfg.num_hidden_layers)
    weights: dict[str, torch.Tensor] = {}
    for name, shape in hf_tensor_shapes(cfg).items():
        if len(shape) == 1:  # RMSNorm weights: away from 1 so a skipped norm would show
            w = 0.5 + torch.rand(shape, generator=gen)
        elif name == "model.embed_tokens.weight":
            w = torch.randn(shape, generator=gen)
        elif name == "lm_head.weight":
            w = torch.randn(shape, generator=gen) * (8.0 / math.sqrt(shape[1]))
        else:
            w = torch.randn(shape, generator=gen) / math.sqrt(shape[1])
            if name.endswith(("o_proj.weight", "w2.weight")):
                w = w * residual_scale
        weights[name] = w.to(dtype)
    return weights


def _tokenizer_config() -> dict[str, object]:
    # Lets transformers and vLLM (the benchmark peers) load the same folder.
    return {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
    }


def _write_hf(out: Path, cfg: ModelConfig, weights: dict[str, torch.Tensor], shard_bytes: int | None) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in weights.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shard_bytes and size and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map: dict[str, str] = {}
        for k, shard in enumerate(shards):
            fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            weight_map.update({name: fname for name in shard})
        total = sum(t.numel() * t.element_size() for t in weights.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hf_cfg = cfg.to_hf() | {"torch_dtype": str(next(iter(weights.values())).dtype).removeprefix("torch.")}
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(), indent=2))
    shutil.copyfile(shipped_tokenizer(cfg.vocab_size), out / "tokenizer.model")


def _write_mistral(out: Path, cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        heads = rotary_heads(name, cfg)
        if heads is not None:
            tensor = permute_hf_to_mistral(tensor, heads).contiguous()
        tensors[hf_to_mistral(name)] = tensor
    save_file(tensors, str(out / "consolidated.safetensors"))
    (out / "params.json").write_text(json.dumps(cfg.to_mistral(), indent=2))
    src = shipped_tokenizer(cfg.vocab_size)
    shutil.copyfile(src, out / ("tokenizer.model.v3" if cfg.vocab_size == 32768 else "tokenizer.model.v1"))


def write_checkpoint(
    out: str | Path,
    cfg: ModelConfig,
    layout: Layout = "hf",
    seed: int = 0,
    dtype: str = "bfloat16",
    shard_mb: int | None = None,
) -> Path:
    """Write a random-weight checkpoint; `shard_mb` splits Hugging Face weights into shards."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = random_weights(cfg, seed, DTYPES[dtype])
    if layout == "hf":
        _write_hf(out, cfg, weights, shard_mb * 2**20 if shard_mb else None)
    elif layout == "mistral":
        _write_mistral(out, cfg, weights)
    else:
        raise ValueError(f"layout must be 'hf' or 'mistral', got {layout!r}")
    return out


def default_model_dir() -> Path:
    """The embedded default: the `tiny` preset, written once into the user's cache."""
    path = Path.home() / ".cache" / "mixtral-serve" / "tiny-hf"
    if not (path / "config.json").is_file():
        tmp = path.with_name(path.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        write_checkpoint(tmp, PRESETS["tiny"], layout="hf", seed=0, dtype="float32")
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    return path
