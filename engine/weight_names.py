"""Tensor names and shapes of Mixtral checkpoints, and the Mistral <-> Hugging Face mapping.

Hugging Face names are the canonical ones inside the engine: the loader maps Mistral names
onto them and the checkpoint writer maps them back.
"""

from __future__ import annotations

import re

import torch

from engine.model_config import ModelConfig

# (Hugging Face pattern, Mistral pattern); {L} = layer index, {E} = expert index.
_NAME_TABLE: list[tuple[str, str]] = [
    ("model.embed_tokens.weight", "tok_embeddings.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "output.weight"),
    ("model.layers.{L}.input_layernorm.weight", "layers.{L}.attention_norm.weight"),
    ("model.layers.{L}.post_attention_layernorm.weight", "layers.{L}.ffn_norm.weight"),
    ("model.layers.{L}.self_attn.q_proj.weight", "layers.{L}.attention.wq.weight"),
    ("model.layers.{L}.self_attn.k_proj.weight", "layers.{L}.attention.wk.weight"),
    ("model.layers.{L}.self_attn.v_proj.weight", "layers.{L}.attention.wv.weight"),
    ("model.layers.{L}.self_attn.o_proj.weight", "layers.{L}.attention.wo.weight"),
    ("model.layers.{L}.block_sparse_moe.gate.weight", "layers.{L}.feed_forward.gate.weight"),
    (
        "model.layers.{L}.block_sparse_moe.experts.{E}.{W}.weight",
        "layers.{L}.feed_forward.experts.{E}.{W}.weight",
    ),
]


def _compile(pattern: str) -> re.Pattern[str]:
    regex = re.escape(pattern)
    for key, group in (("L", r"(?P<L>\d+)"), ("E", r"(?P<E>\d+)"), ("W", r"(?P<W>w[123])")):
        regex = regex.replace(re.escape("{" + key + "}"), group)
    return re.compile(regex + r"\Z")


_HF_TO_MISTRAL = [(_compile(hf), mistral) for hf, mistral in _NAME_TABLE]
_MISTRAL_TO_HF = [(_compile(mistral), hf) for hf, mistral in _NAME_TABLE]


def _translate(name: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    for regex, target in table:
        match = regex.match(name)
        if match:
            return target.format(**match.groupdict())
    return None


def mistral_to_hf(name: str) -> str | None:
    """Hugging Face name of a Mistral tensor, or None when the name is not a Mixtral tensor."""
    return _translate(name, _MISTRAL_TO_HF)


def hf_to_mistral(name: str) -> str:
    target = _translate(name, _HF_TO_MISTRAL)
    if target is None:
        raise KeyError(f"{name} is not a Mixtral tensor name")
    return target


def hf_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face Mixtral checkpoint holds, with its shape, in a fixed order."""
    d, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d)}
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "self_attn.q_proj.weight"] = (cfg.q_size, d)
        shapes[p + "self_attn.k_proj.weight"] = (cfg.kv_size, d)
        shapes[p + "self_attn.v_proj.weight"] = (cfg.kv_size, d)
        shapes[p + "self_attn.o_proj.weight"] = (d, cfg.q_size)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        shapes[p + "block_sparse_moe.gate.weight"] = (cfg.num_local_experts, d)
        for e in range(cfg.num_local_experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            shapes[q + "w1.weight"] = (i, d)
            shapes[q + "w2.weight"] = (d, i)
            shapes[q + "w3.weight"] = (i, d)
    shapes["model.norm.weight"] = (d,)
    shapes["lm_head.weight"] = (v, d)
    return shapes


def rotary_heads(hf_name: str, cfg: ModelConfig) -> int | None:
    """How many heads a q/k projection holds (they need the rotary permutation), else None."""
    if hf_name.endswith("self_attn.q_proj.weight"):
        return cfg.num_attention_heads
    if hf_name.endswith("self_attn.k_proj.weight"):
        return cfg.num_key_value_heads
    return None


# NOTE: Mistral stores q/k rows with rotary pairs interleaved (x0, x1 rotate together);
# Hugging Face splits each head in halves (x_j rotates with x_{j+hd/2}).
def permute_mistral_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape  # [n_heads * hd, D]
    hd = rows // n_heads
    return w.view(n_heads, hd // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_hf_to_mistral(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape  # [n_heads * hd, D]
    hd = rows // n_heads
    return w.view(n_heads, 2, hd // 2, cols).transpose(1, 2).reshape(rows, cols)
