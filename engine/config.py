"""Typed configuration of the engine: what it loads (`EngineConfig`) and what can be tuned while it
runs (`SchedulerConfig`). Defined once, here; the serving layer's config embeds these types.

A leaf module: pydantic only, no torch, so the router and the config tooling import it for free.
Adding a setting is one field here and its use where the engine reads it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, model_validator

DTypeName = Literal["auto", "float32", "bfloat16", "float16"]
ChatTemplate = Literal["mistral", "llama2-sys"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CacheConfig(_Strict):
    block_size: int = Field(16, ge=1, le=1024)
    # The KV pool is sized from `kv_cache_bytes` when set (an int, or a size such as "32MiB"),
    # else from a fraction of the memory still available after the weights are loaded.
    kv_cache_bytes: Annotated[ByteSize, Field(gt=0)] | None = None
    kv_cache_fraction: float = Field(0.25, gt=0.0, le=0.95)
    enable_prefix_caching: bool = True


class SchedulerConfig(_Strict):
    """The runtime-tunable subset: the knobs that trade latency against throughput. A serving tier's
    `tuning` block is this type, applied live between two steps (`LLMEngine.reconfigure`)."""

    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    policy: Literal["fcfs", "priority"] = "fcfs"
    # Inter-token latency target: when set, the sequence cap and token budget adapt online so the
    # measured step period stays under it less the margin below (engine/latency_controller.py);
    # the maxima above remain upper bounds.
    itl_target_ms: float | None = Field(None, gt=0)
    # The part of the ITL target left to whatever carries tokens after the engine (a server's
    # hops to the client): the jitter it adds, which the engine cannot measure.
    itl_serving_margin_ms: float = Field(0.0, ge=0)
    # Requests still without a first token after this long count as TTFT breaches
    # (`AsyncEngine.ttft_breaches`); a server can scale out on them.
    ttft_target_ms: float | None = Field(None, gt=0)
    # Streamed outputs of a request are held in the engine core and handed over together at the first
    # step this long after the previous hand-off (the first and last at once; engine/output_hold.py):
    # fewer, larger messages and fewer wake-ups of the server for throughput. 0 = every step.
    stream_flush_ms: float = Field(0.0, ge=0.0, le=1000.0)
    # A cap on the streamed messages per second across all of an engine's streams: each stream's
    # flush interval widens to (streams / cap) when that is longer than stream_flush_ms. Every
    # message costs the serving path a fixed amount of CPU (~2-3 ms on two cores through Ray Serve),
    # so without a cap many slow streams spend on messages what the engine needs. None: no cap.
    stream_max_messages_per_s: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "SchedulerConfig":
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}) so every running sequence can decode in one step"
            )
        if self.itl_target_ms is not None and self.itl_serving_margin_ms >= self.itl_target_ms:
            raise ValueError(
                f"itl_serving_margin_ms ({self.itl_serving_margin_ms}) must be below itl_target_ms ({self.itl_target_ms})"
            )
        return self

    @property
    def target_step_seconds(self) -> float | None:
        """The step period the latency controller holds, or None (fixed caps)."""
        if self.itl_target_ms is None:
            return None
        return (self.itl_target_ms - self.itl_serving_margin_ms) / 1000


class DecodeGraphConfig(_Strict):
    """CUDA graphs for decode steps (engine/decode_graphs.py), on CUDA devices."""

    # Decode batches and contexts up to these sizes replay captured graphs; larger ones run
    # eagerly. max_batch 0 turns graphs off.
    max_batch: int = Field(64, ge=0)
    max_context: int = Field(8192, ge=1)


class LoRAConfig(_Strict):
    """LoRA adapters per request (engine/lora_weights.py). Every slot holds one adapter's weights for
    every layer at `max_lora_rank`, allocated at start-up; 0 slots turn adapters off."""

    max_loras: int = Field(0, ge=0)  # adapters resident at once (one step mixes all of them)
    max_lora_rank: int = Field(16, ge=1, le=512)
    # Adapters read from disk kept in host memory, so one evicted from its slot reloads without I/O.
    max_cpu_loras: int = Field(16, ge=1)


class EngineConfig(_Strict):
    # A checkpoint folder; None = the embedded tiny random-weight checkpoint (written on first use).
    model: str | None = None
    dtype: DTypeName = "auto"
    device: str = "cpu"
    max_model_len: int | None = Field(None, ge=1)
    # Ranks of one engine. Rank 0 schedules and samples; the others are local processes, or
    # whatever the caller's launcher starts (Ray actors under Serve).
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
    # Decode attention: "cpu" (the CPU kernel) and "triton" (the GPU kernel) read the paged cache in
    # place; "torch" gathers each context for SDPA; "auto": triton on GPUs, cpu where the CPU
    # kernels run, else torch.
    attention_backend: Literal["auto", "torch", "triton", "cpu"] = "auto"
    chat_template: ChatTemplate = "mistral"
    # The shared generator of requests without their own `seed`. None: fresh entropy at every start,
    # so unseeded sampling differs across replicas and restarts; an int makes it reproducible.
    seed: int | None = None
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    decode_graphs: DecodeGraphConfig = DecodeGraphConfig()
    lora: LoRAConfig = LoRAConfig()
    load_progress: bool = True
    # Threads a step computes on (CPU). None: every physical core this process may run on, shared
    # evenly by tensor-parallel ranks; OMP_NUM_THREADS is not read (Ray sets it to 1 in actors that
    # reserve under one CPU). Fewer leave cores to other work on the host (other replicas).
    cpu_threads: int | None = Field(None, ge=1)
    # The async front (a server's) runs the engine core in a process of its own: a step there runs
    # at the synchronous engine's speed, apart from the server's event loop and its GIL
    # (engine/engine_core.py). False: on a thread of the server's process.
    core_process: bool = True
    # How the core process's step threads wait between parallel regions (GNU OpenMP's wait policy).
    # "sleep": they yield the core at once, for processes sharing it (a server's proxy, router and
    # replica); "spin": GNU's default, a busy-wait of ~3 ms before sleeping (not ACTIVE, which spins
    # for minutes after the last step), faster steps on a host with nothing else to run. On 2 cores
    # (tiny checkpoint, 1 / 16 / 64 streams) through Serve "sleep" gave 955 / 2,655 / 3,934 tokens/s
    # against 479 / 2,085 / 3,390; the AsyncEngine alone "spin" 0.84-0.91x / 0.86x / 0.73-0.78x of
    # the offline engine against 0.79-0.95x / 0.68-0.72x / 0.69-0.72x. Hosts differ: on an Intel Xeon
    # VM, where waking a thread costs more, "spin" won both ways, and served the bench checkpoint at
    # 0.85x of the engine against 0.68-0.72x (1 and 16 streams; README, "Serving path").
    cpu_wait: Literal["sleep", "spin"] = "sleep"
