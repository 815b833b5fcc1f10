"""Typed configuration of the engine layer; the serving layer builds one and passes it down."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.linear import onednn_bf16_available
from engine.tokenizer import ChatTemplate

DTypeName = Literal["auto", "float32", "bfloat16", "float16"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CacheConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    block_size: int = Field(16, ge=1, le=1024)
    # The KV pool is sized from `kv_cache_bytes` when set, else from a fraction of the memory
    # still available after the weights are loaded.
    kv_cache_bytes: int | None = Field(None, gt=0)
    kv_cache_fraction: float = Field(0.25, gt=0.0, le=0.95)
    enable_prefix_caching: bool = True


class SchedulerConfig(BaseModel):
    """The knobs a tier tunes: they trade latency against throughput."""

    model_config = ConfigDict(extra="forbid")

    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    policy: Literal["fcfs", "priority"] = "fcfs"
    # Inter-token latency target: when set, the sequence cap and token budget adapt online so
    # the measured step period stays under it (engine/latency_controller.py); the maxima above
    # remain upper bounds.
    target_step_seconds: float | None = Field(None, gt=0)


class DecodeGraphConfig(BaseModel):
    """CUDA graphs for decode steps (engine/decode_graphs.py), on CUDA devices."""

    model_config = ConfigDict(extra="forbid")

    # Decode batches and contexts up to these sizes replay captured graphs; larger ones run
    # eagerly. max_batch 0 turns graphs off.
    max_batch: int = Field(64, ge=0)
    max_context: int = Field(8192, ge=1)


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    dtype: DTypeName = "auto"
    device: str = "cpu"
    max_model_len: int | None = Field(None, ge=1)
    tensor_parallel_size: int = Field(1, ge=1)
    # fp8 (e4m3) weights for attention and experts; router, norms, embeddings, LM head stay.
    quantization: Literal["fp8"] | None = None
    fp8_per_channel: bool = True  # one scale per output row (False: one per weight matrix)
    # The project's CPU kernels (engine/cpu_kernels.c) for dense projections, norms and decode
    # attention, and for the experts with moe_backend "cpu": "amx" (Intel AMX tiles), "avx512"
    # (AVX512-BF16), "off" (oneDNN and PyTorch ops), or "auto": the best this CPU runs, for bf16
    # models. They keep fp8 weights in fp8.
    cpu_kernels: Literal["auto", "amx", "avx512", "off"] = "auto"
    # Expert computation: "cpu" (the whole block of a layer in one CPU kernel call), "torch" (oneDNN
    # matmuls per expert, any CPU), "triton" (the fused GPU kernel, which keeps fp8 expert weights
    # in fp8), or "auto": triton on GPUs, cpu where the CPU kernels run, else torch.
    moe_backend: Literal["auto", "torch", "triton", "cpu"] = "auto"
    chat_template: ChatTemplate = "mistral"
    seed: int = 0
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    decode_graphs: DecodeGraphConfig = DecodeGraphConfig()
    load_progress: bool = True

    @model_validator(mode="after")
    def _check(self) -> "EngineConfig":
        if self.scheduler.max_num_batched_tokens < self.scheduler.max_num_seqs:
            raise ValueError(
                f"scheduler.max_num_batched_tokens ({self.scheduler.max_num_batched_tokens}) must be "
                f">= scheduler.max_num_seqs ({self.scheduler.max_num_seqs}) so every running "
                "sequence can decode in one step"
            )
        return self

    def torch_dtype(self, checkpoint_dtype: str | None) -> torch.dtype:
        """`auto`: the checkpoint's dtype on GPUs; bf16 on CPUs with oneDNN bf16 kernels, else fp32.

        NOTE: on CPU, plain PyTorch bf16 matrix-vector products run several times below memory
        bandwidth, so bf16 pays only with oneDNN-reordered weights (engine/linear.py); without
        those kernels fp32 decodes faster even though it reads twice the bytes.
        """
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        if self.device == "cpu":
            return torch.bfloat16 if onednn_bf16_available() else torch.float32
        return _DTYPES.get(checkpoint_dtype or "bfloat16", torch.bfloat16)
