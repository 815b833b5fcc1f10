"""Mixtral in PyTorch over a flat batch of tokens and a paged KV cache.

Weights use the engine's fused layout: `qkv [(H + 2 KVH) hd, D]`, `w13 [E, 2I, D]` (w1 rows,
then w3 rows) and `w2 [E, D, I]`, reduction dimension contiguous. The loader fills them
tensor by tensor (`engine.loader.weight_slot`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine import cpu_kernels
from engine.attention import AttentionBackend, AttentionMetadata, DecodeKernel, paged_attention, write_kv
from engine.linear import Linear
from engine.lora_weights import StepLoRA
from engine.model_config import ModelConfig
from engine.moe import Expert, MoEBackend, cpu_moe_with_lora, fused_moe, make_experts, select_experts
from engine.parallel import LocalShape, TPGroup
from engine.quant import FP8


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    # Uninitialised: every parameter is overwritten by the loader, which checks none is missed.
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


def _prepared(param: nn.Parameter, scale: nn.Parameter | None, isa: cpu_kernels.Isa | None) -> Linear:
    """The inference layout of a loaded weight; the parameter lets go of a weight that was copied."""
    linear = Linear(param.data, None if scale is None else scale.data, isa)
    if linear.repacked:
        param.data = param.data.new_empty(0)
    return linear


def _prepared_experts(w13: nn.Parameter, w2: nn.Parameter) -> list[Expert]:
    experts = make_experts(w13.data, w2.data)
    if experts[0].down.repacked:  # the kernels' copies are the only ones kept
        w13.data, w2.data = w13.data.new_empty(0), w2.data.new_empty(0)
    return experts


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _param(dim, dtype=dtype)
        self.kernel: cpu_kernels.AddRMSNorm | None = None  # set by `prepare` where the CPU kernels run

    def prepare(self, isa: cpu_kernels.Isa | None) -> None:
        if isa is not None:
            self.kernel = cpu_kernels.AddRMSNorm(isa, self.weight.data, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(x.contiguous())  # [T, D]
        # One fused op; it accumulates in fp32 and rounds once (the reference rounds the
        # normalised value, then the product: bf16 results differ in the last bit).
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # [T, D]

    def add_forward(self, h: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream h + delta [T, D] (h itself, updated, on the CPU kernel) and its norm."""
        if self.kernel is not None:
            return h, self.kernel(h, delta)
        h = h + delta  # [T, D]
        return h, self.forward(h)


class Rotary(nn.Module):
    """Half-split rotary embeddings (Hugging Face order) with cos/sin precomputed per position."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, dtype: torch.dtype) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # [P, hd/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [P, hd]
        self.register_buffer("cos", emb.cos().to(dtype), persistent=False)  # [P, hd]
        self.register_buffer("sin", emb.sin().to(dtype), persistent=False)  # [P, hd]

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for these positions, [T, 1, hd] each: looked up once per step, used by every layer."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)  # [T, h, hd/2] each
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin  # [T, h, hd]


class Attention(nn.Module):
    """This rank's heads (all of them without tensor parallelism); `fp8`: projections in fp8 with
    one fp32 scale per output row."""

    def __init__(self, cfg: ModelConfig, local: LocalShape, tp: TPGroup, dtype: torch.dtype, fp8: bool) -> None:
        super().__init__()
        self.tp = tp
        self.n_heads, self.n_kv, self.hd = local.n_heads, local.n_kv_heads, cfg.head_dim
        wdtype = FP8 if fp8 else dtype
        qkv_rows = (self.n_heads + 2 * self.n_kv) * self.hd
        self.qkv = _param(qkv_rows, cfg.hidden_size, dtype=wdtype)
        self.o = _param(cfg.hidden_size, self.n_heads * self.hd, dtype=wdtype)
        self.qkv_scale = _param(qkv_rows, dtype=torch.float32) if fp8 else None
        self.o_scale = _param(cfg.hidden_size, dtype=torch.float32) if fp8 else None
        self.qkv_proj: Linear | None = None  # set by `Mixtral.prepare`
        self.o_proj: Linear | None = None
        self.decode_kernel: DecodeKernel | None = None  # None: SDPA over gathered contexts
        self.rope_kernel: cpu_kernels.RopeAndCache | None = None

    def prepare(self, isa: cpu_kernels.Isa | None, attention: AttentionBackend) -> None:
        self.qkv_proj, self.o_proj = _prepared(self.qkv, self.qkv_scale, isa), _prepared(self.o, self.o_scale, isa)
        if isa is not None:
            self.rope_kernel = cpu_kernels.RopeAndCache(isa, self.n_heads, self.n_kv, self.hd)
        if attention == "cpu" and isa is not None and cpu_kernels.fits_attention(self.n_heads, self.n_kv, self.hd):
            self.decode_kernel = cpu_kernels.DecodeAttention(isa, self.n_heads, self.n_kv, self.hd)
        elif attention == "triton":
            from engine.paged_attention_triton import paged_decode_attention  # GPU-only dependency, imported on use

            self.decode_kernel = paged_decode_attention

    def forward(
        self,
        x: torch.Tensor,  # [T, D]
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin [T, 1, hd]
        kv_cache: torch.Tensor,  # [2, S, KVH, hd]
        meta: AttentionMetadata,
        lora: StepLoRA | None = None,
    ) -> torch.Tensor:
        assert self.qkv_proj is not None and self.o_proj is not None, "call Mixtral.prepare() after loading"
        t = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, (H + 2 KVH) hd]
        if lora is not None:
            lora.add_qkv(qkv, x)
        qkv = qkv.view(t, self.n_heads + 2 * self.n_kv, self.hd)  # [T, H + 2 KVH, hd]
        k_cache, v_cache = kv_cache[0], kv_cache[1]  # [S, KVH, hd] each
        if self.rope_kernel is not None:  # rotates q and k in place and writes this step's K/V
            self.rope_kernel(qkv, *rope, meta.slot_mapping, k_cache, v_cache)
            q, k, v = qkv.split([self.n_heads, self.n_kv, self.n_kv], dim=1)  # [T, H | KVH | KVH, hd]
        else:
            # q and k heads rotate together: one rotary application per layer.
            qk = apply_rotary(qkv[:, : self.n_heads + self.n_kv], *rope)  # [T, H + KVH, hd]
            q, k = qk.split([self.n_heads, self.n_kv], dim=1)  # [T, H, hd], [T, KVH, hd]
            v = qkv[:, self.n_heads + self.n_kv :]  # [T, KVH, hd]
            write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        attn = paged_attention(q, k, v, k_cache, v_cache, meta, self.decode_kernel)  # [T, H hd]
        out = self.o_proj(attn)  # [T, D] this rank's heads' share
        if lora is not None:
            lora.add_o(out, attn)
        return self.tp.all_reduce(out)  # [T, D] summed over ranks' heads


class MoE(nn.Module):
    """Every expert, with this rank's slice of its intermediate dimension.

    Backends: "torch" runs `engine.moe.fused_moe` over per-expert `Linear`s (CPUs); "cpu" runs the
    whole block as one call of the project's CPU kernel over packed weights (`engine.cpu_kernels`);
    "triton" runs the fused GPU kernel straight over the stacked weights. The kernels read fp8
    as it is (`fp8`: weights float8_e4m3fn with one fp32 scale per output row).
    """

    def __init__(
        self, cfg: ModelConfig, local: LocalShape, tp: TPGroup, dtype: torch.dtype, backend: MoEBackend, fp8: bool
    ) -> None:
        super().__init__()
        self.tp = tp
        self.top_k = cfg.num_experts_per_tok
        self.backend = backend
        e, d, i = cfg.num_local_experts, cfg.hidden_size, local.intermediate
        wdtype = FP8 if fp8 else dtype
        self.gate = _param(e, d, dtype=dtype)
        self.w13 = _param(e, 2 * i, d, dtype=wdtype)
        self.w2 = _param(e, d, i, dtype=wdtype)
        self.w13_scale = _param(e, 2 * i, dtype=torch.float32) if fp8 else None
        self.w2_scale = _param(e, d, dtype=torch.float32) if fp8 else None
        self.experts: list[Expert] = []  # set by `Mixtral.prepare` for the torch backend
        self.cpu_experts: cpu_kernels.CpuExperts | None = None  # for cpu
        self.router: cpu_kernels.Router | None = None  # routing in one CPU kernel call, where they run
        self.triton_moe: Callable[..., torch.Tensor] | None = None  # set by `Mixtral.prepare` for triton
        self.gate_f32 = torch.empty(0)

    def prepare(self, isa: cpu_kernels.Isa | None) -> None:
        if self.backend == "torch":
            self.experts = _prepared_experts(self.w13, self.w2)
        elif self.backend == "cpu":
            assert isa is not None, "the cpu backend runs on resolved CPU kernels"
            scales = (None, None) if self.w13_scale is None else (self.w13_scale.data, self.w2_scale.data)
            self.cpu_experts = cpu_kernels.CpuExperts(isa, self.w13.data, self.w2.data, *scales)
            self.w13.data, self.w2.data = self.w13.data.new_empty(0), self.w2.data.new_empty(0)  # packed copy kept
        else:
            from engine.fused_moe_triton import fused_moe_triton  # GPU-only dependency, imported on use

            self.triton_moe = fused_moe_triton
        # NOTE: the router is [E, D], a few KB: an fp32 matmul costs microseconds where a bf16 one
        # with N = E = 8 falls on a slow CPU path (hundreds of microseconds per layer in a decode
        # step), and routing in fp32 is at least as accurate.
        self.gate_f32 = self.gate.data.float()
        if isa is not None:
            self.router = cpu_kernels.Router(isa, self.gate_f32, self.top_k)

    def forward(self, x: torch.Tensor, lora: StepLoRA | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the block output [T, D] and each token's chosen experts [T, k]."""
        if self.router is not None:
            weights, ids = self.router(x)  # [T, k], [T, k]
        else:
            weights, ids = select_experts(x.float() @ self.gate_f32.t(), self.top_k)  # [T, k], [T, k]
        experts_lora = None if lora is None else lora.experts(ids)
        if self.triton_moe is not None:
            out = self.triton_moe(x, self.w13, self.w2, weights, ids, self.w13_scale, self.w2_scale,
                                  lora=experts_lora)  # [T, D]
        elif self.cpu_experts is not None and experts_lora is not None:
            out = cpu_moe_with_lora(self.cpu_experts, x, weights, ids, experts_lora)  # [T, D] this rank's part
        elif self.cpu_experts is not None:
            out = self.cpu_experts(x, weights, ids)  # [T, D] partial sum over this rank's slice
        else:
            out = fused_moe(x, self.experts, weights, ids, experts_lora)  # [T, D] partial sum over this rank's slice
        return self.tp.all_reduce(out), ids


class DecoderLayer(nn.Module):
    def __init__(
        self, cfg: ModelConfig, local: LocalShape, tp: TPGroup, dtype: torch.dtype, backend: MoEBackend, fp8: bool
    ) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.attn = Attention(cfg, local, tp, dtype, fp8)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.moe = MoE(cfg, local, tp, dtype, backend, fp8)


class Mixtral(nn.Module):
    """The whole model, or one tensor-parallel rank's share of it (embeddings, norms, router
    and LM head are replicated)."""

    def __init__(
        self,
        cfg: ModelConfig,
        dtype: torch.dtype,
        tp: TPGroup | None = None,
        moe_backend: MoEBackend = "torch",
        fp8_weights: bool = False,
        cpu_isa: cpu_kernels.Isa | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.cpu_isa = cpu_isa  # the project's CPU kernels: dense projections, norms, decode attention
        self.tp = tp or TPGroup()
        self.local = LocalShape.of(cfg, self.tp)
        self.fp8_weights = fp8_weights
        self.embed = _param(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, self.local, self.tp, dtype, moe_backend, fp8_weights)
            for _ in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = _param(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.rotary = Rotary(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, dtype)
        self.lm_head_proj: Linear | None = None

    def prepare(self, attention: AttentionBackend = "torch") -> "Mixtral":
        """Puts loaded weights into their inference layouts and picks the decode-attention kernel
        (`resolve_attention_backend`); the model runs only after this."""
        isa = self.cpu_isa
        for layer in self.layers:
            layer.attn_norm.prepare(isa)
            layer.attn.prepare(isa, attention)
            layer.ffn_norm.prepare(isa)
            layer.moe.prepare(isa)
        self.norm.prepare(isa)
        self.lm_head_proj = _prepared(self.lm_head, None, isa)
        return self

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: torch.Tensor,  # [L, 2, S, KVH, hd]
        meta: AttentionMetadata,
        lora: StepLoRA | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states [T, D] (normalised; `logits` projects the rows that sample) and
        each layer's expert choices [L, T, k]; `lora`: the adapters of the step's rows."""
        h = F.embedding(input_ids, self.embed)  # [T, D] residual stream
        rope = self.rotary.tables(positions)
        routed: list[torch.Tensor] = []
        x = self.layers[0].attn_norm(h)  # [T, D]
        # Each residual add is done together with the norm that follows it.
        next_norms = [layer.attn_norm for layer in self.layers[1:]] + [self.norm]
        for i, layer in enumerate(self.layers):
            if lora is not None:
                lora.layer = i
            h, x = layer.ffn_norm.add_forward(h, layer.attn(x, rope, kv_caches[i], meta, lora))  # [T, D] x2
            moe_out, ids = layer.moe(x, lora)  # [T, D], [T, k]
            h, x = next_norms[i].add_forward(h, moe_out)  # [T, D] x2
            routed.append(ids)
        return x, torch.stack(routed)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        assert self.lm_head_proj is not None, "call Mixtral.prepare() after loading"
        return self.lm_head_proj(hidden).float()  # [N, V]
