"""The model's architecture, read from Hugging Face `config.json` or Mistral `params.json`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

CheckpointFormat = Literal["hf", "mistral"]

# NOTE: Mistral's params.json carries no context length; 32K is what 8x7B was trained for
# (8x22B's 64K comes from the Hugging Face config or an explicit `max_seq_len`).
DEFAULT_MISTRAL_CONTEXT = 32768


class ModelConfig(BaseModel):
    """Mixtral architecture. Field names follow Hugging Face's MixtralConfig."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    vocab_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    num_local_experts: int = Field(gt=0)
    num_experts_per_tok: int = Field(gt=0)
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 32768
    sliding_window: int | None = None
    bos_token_id: int = 1
    eos_token_id: int = 2

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds "
                f"num_local_experts ({self.num_local_experts})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        return self

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    # ---- Hugging Face config.json -------------------------------------------------------
    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        arch = cfg.get("model_type")
        if arch not in (None, "mixtral"):
            raise ValueError(f"config.json has model_type {arch!r}; only 'mixtral' is supported")
        heads = cfg["num_attention_heads"]
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            num_local_experts=cfg["num_local_experts"],
            num_experts_per_tok=cfg["num_experts_per_tok"],
            rope_theta=cfg.get("rope_theta", 1e6),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            max_position_embeddings=cfg.get("max_position_embeddings", DEFAULT_MISTRAL_CONTEXT),
            sliding_window=cfg.get("sliding_window"),
            bos_token_id=cfg.get("bos_token_id", 1),
            eos_token_id=cfg.get("eos_token_id", 2),
        )

    def to_hf(self) -> dict[str, Any]:
        return {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_local_experts": self.num_local_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "sliding_window": self.sliding_window,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "attention_dropout": 0.0,
            "router_aux_loss_coef": 0.02,
            "output_router_logits": False,
            "torch_dtype": "bfloat16",
        }

    # ---- Mistral params.json ------------------------------------------------------------
    @classmethod
    def from_mistral(cls, params: dict[str, Any]) -> "ModelConfig":
        moe = params.get("moe")
        if not moe:
            raise ValueError("params.json has no 'moe' section: not a Mixtral checkpoint")
        return cls(
            vocab_size=params["vocab_size"],
            hidden_size=params["dim"],
            intermediate_size=params["hidden_dim"],
            num_hidden_layers=params["n_layers"],
            num_attention_heads=params["n_heads"],
            num_key_value_heads=params.get("n_kv_heads") or params["n_heads"],
            head_dim=params.get("head_dim") or params["dim"] // params["n_heads"],
            num_local_experts=moe["num_experts"],
            num_experts_per_tok=moe["num_experts_per_tok"],
            rope_theta=params.get("rope_theta") or 1e6,
            rms_norm_eps=params.get("norm_eps", 1e-5),
            max_position_embeddings=params.get("max_seq_len", DEFAULT_MISTRAL_CONTEXT),
            sliding_window=_parse_sliding_window(params.get("sliding_window")),
        )

    def to_mistral(self) -> dict[str, Any]:
        return {
            "dim": self.hidden_size,
            "n_layers": self.num_hidden_layers,
            "head_dim": self.head_dim,
            "hidden_dim": self.intermediate_size,
            "n_heads": self.num_attention_heads,
            "n_kv_heads": self.num_key_value_heads,
            "norm_eps": self.rms_norm_eps,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "max_seq_len": self.max_position_embeddings,
            "sliding_window": self.sliding_window,
            "moe": {
                "num_experts": self.num_local_experts,
                "num_experts_per_tok": self.num_experts_per_tok,
            },
        }


def _parse_sliding_window(value: Any) -> int | None:
    """params.json writes the window as an int, a per-layer list, a string or null."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"params.json sliding_window must be a number, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "none", "null"):
            return None
        if text.isdigit():
            return int(text)
        raise ValueError(f"params.json sliding_window {value!r} is not a number")
    if isinstance(value, list):
        windows = {_parse_sliding_window(v) for v in value}
        if len(windows) != 1:
            raise ValueError(
                f"params.json sliding_window {value!r}: per-layer windows that differ "
                "are not supported by Mixtral"
            )
        return windows.pop()
    raise ValueError(f"params.json sliding_window has unsupported type {type(value).__name__}")


def detect_format(model_dir: Path) -> CheckpointFormat:
    """Which layout a checkpoint folder uses; Hugging Face wins when both are present."""
    if (model_dir / "config.json").is_file():
        return "hf"
    if (model_dir / "params.json").is_file():
        return "mistral"
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model path {model_dir} does not exist or is not a folder")
    raise ValueError(
        f"{model_dir} is not a Mixtral checkpoint: expected config.json (Hugging Face) "
        "or params.json (Mistral)"
    )


def load_model_config(model_dir: Path) -> tuple[ModelConfig, CheckpointFormat]:
    fmt = detect_format(model_dir)
    if fmt == "hf":
        return ModelConfig.from_hf(json.loads((model_dir / "config.json").read_text())), fmt
    return ModelConfig.from_mistral(json.loads((model_dir / "params.json").read_text())), fmt
