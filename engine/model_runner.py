"""Turns a scheduled step into one flat model batch, runs the model and samples."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.attention import AttentionMetadata, PrefillChunk, resolve_attention_backend
from engine.config import DecodeGraphConfig, EngineConfig, LoRAConfig
from engine.decode_graphs import DecodeGraphs, DecodeInputs
from engine.host_cpus import step_threads
from engine.host_memory import keep_freed_memory
from engine.linear import onednn_bf16_available
from engine.loader import load_model
from engine.lora_request import LoRARequest
from engine.lora_weights import AdapterCache, LoRAWeights
from engine.cpu_kernels import resolve_isa
from engine.model import Mixtral
from engine.moe import resolve_moe_backend
from engine.model_config import ModelConfig, load_model_config
from engine.parallel import TPGroup, init_group
from engine.sampling import Sampler, SamplerOutput, SamplingRow
from engine.scheduler import ScheduledSeq

log = logging.getLogger(__name__)


def kv_bytes_per_block(cfg: ModelConfig, n_kv_heads: int, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return cfg.num_hidden_layers * 2 * block_size * n_kv_heads * cfg.head_dim * elem


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo")


@dataclass
class StepItem:
    """One sequence's part of a step: all a rank needs to run it (broadcast under TP)."""

    token_ids: list[int]  # the tokens computed this step
    start: int  # position of the first of them
    block_table: list[int]
    lora_slot: int = -1  # the adapter slot it runs (-1: the base model)

    @property
    def is_decode(self) -> bool:
        return len(self.token_ids) == 1 and self.start > 0


@dataclass
class StepOutput:
    sampled: list[ScheduledSeq]  # the items that produced a token, in `tokens` order
    tokens: SamplerOutput


class ModelRunner:
    """`graphs`: pad decode-only steps to buckets and replay them from CUDA graphs (captured on
    CUDA; on a CPU the padded path runs eagerly)."""

    def __init__(
        self,
        model: Mixtral,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        eos_id: int,
        graphs: DecodeGraphConfig | None = None,
        lora: LoRAConfig = LoRAConfig(),
    ) -> None:
        cfg = model.cfg
        self.model = model
        self.tp = model.tp
        self.num_blocks = num_blocks
        self.cfg = cfg
        self.block_size = block_size
        self.device = device
        self.eos_id = eos_id
        dtype = model.embed.dtype
        # With graphs, one block more than the block manager is told of: padding rows write there.
        self.pad_block = num_blocks if graphs is not None else 0
        self.kv_caches = torch.zeros(  # [L, 2, S, KVH, hd]
            cfg.num_hidden_layers, 2, (num_blocks + (graphs is not None)) * block_size, model.local.n_kv_heads,
            cfg.head_dim, dtype=dtype, device=device,
        )
        self.sampler = Sampler()
        self._block_offsets = torch.arange(block_size, device=device)  # [bs]
        # Tokens routed to each expert since start, counted on the device: reading them is the
        # stats' business, not the step's (a read would wait for the GPU mid-step).
        self.expert_counts = torch.zeros(cfg.num_hidden_layers * cfg.num_local_experts, dtype=torch.long,
                                         device=device)  # [L * E]
        self._expert_offsets = torch.arange(cfg.num_hidden_layers, device=device).view(-1, 1, 1) * cfg.num_local_experts
        self.graphs = None if graphs is None else DecodeGraphs(graphs, self._decode_forward, block_size, device)
        self.adapters = AdapterCache(cfg, lora.max_lora_rank, lora.max_cpu_loras)
        self.lora = None if not lora.max_loras else LoRAWeights(
            cfg, model.local, lora.max_loras, lora.max_lora_rank, dtype, device, model.cpu_isa)

    def _tensor(self, data: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
        """Host data on the device; on GPUs through pinned memory, so the copy does not block the host."""
        if self.device.type == "cpu":
            return torch.tensor(data, dtype=dtype)
        return torch.tensor(data, dtype=dtype, pin_memory=True).to(self.device, non_blocking=True)

    def capture_graphs(self) -> None:
        """Captures every decode bucket now (start-up), not on first use while serving."""
        if self.graphs is not None and self.graphs.capture:
            self.graphs.capture_all(lambda batch, length: self._decode_inputs([], batch, length))

    def _slots(self, block_table: torch.Tensor, length: int) -> torch.Tensor:
        """Cache slots of positions [0, length) for one block table [nb] (or a batch [B, nb])."""
        slots = block_table.unsqueeze(-1) * self.block_size + self._block_offsets  # [..., nb, bs]
        return slots.flatten(-2)[..., :length]  # [..., length]

    def _window_mask(self, q_pos: torch.Tensor, length: int) -> torch.Tensor:
        """[..., length] True where key position j is visible from query position q_pos."""
        k_pos = torch.arange(length, device=self.device)  # [length]
        mask = k_pos <= q_pos.unsqueeze(-1)
        if self.cfg.sliding_window is not None:
            mask &= k_pos > q_pos.unsqueeze(-1) - self.cfg.sliding_window
        return mask

    def _build(self, items: list[StepItem]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Flat batch tensors for `items`, which list decodes first."""
        ids = [t for item in items for t in item.token_ids]
        pos = [p for item in items for p in range(item.start, item.start + len(item.token_ids))]
        input_ids = self._tensor(ids)  # [T]
        positions = self._tensor(pos)  # [T]
        decodes = [item for item in items if item.is_decode]
        slot_parts: list[torch.Tensor] = []
        decode = None
        if decodes:
            decode = self._decode_inputs(decodes, len(decodes), max(item.start for item in decodes) + 1)
            slot_parts.append(decode.slot_mapping)
        chunks: list[PrefillChunk] = []
        offset = len(decodes)
        window = self.cfg.sliding_window
        for item in items[len(decodes) :]:
            start, n = item.start, len(item.token_ids)
            ctx_slots = self._slots(self._tensor(item.block_table), start + n)  # [C]
            slot_parts.append(ctx_slots[start:])
            # Causal over the context (lower right) needs no mask; only a window that cuts into it does.
            windowed = window is not None and start + n > window
            mask = self._window_mask(positions[offset : offset + n], start + n) if windowed else None  # [q, C]
            chunks.append(PrefillChunk(offset, n, ctx_slots, mask))
            offset += n
        meta = decode.meta() if decode is not None else AttentionMetadata(torch.empty(0), 0, None, None, [])
        meta.slot_mapping = torch.cat(slot_parts)
        meta.prefills = chunks
        return input_ids, positions, meta

    def _decode_inputs(self, decodes: list[StepItem], batch: int, length: int) -> DecodeInputs:
        """Decode rows padded to `batch` rows and `length` context positions.

        Padding rows (token 0 at position 0) see and write only the pad block's first slot; padded
        context positions point into the pad block and are masked out.
        """
        pad, n = self.pad_block, len(decodes)
        width = -(-length // self.block_size)
        tables = self._tensor(  # [B, nb]
            [d.block_table[:width] + [pad] * (width - len(d.block_table)) for d in decodes] + [[pad] * width] * (batch - n)
        )
        positions = self._tensor([d.start for d in decodes] + [0] * (batch - n))  # [B]
        context_slots = self._slots(tables, length)  # [B, L]
        window = self.cfg.sliding_window
        return DecodeInputs(
            input_ids=self._tensor([d.token_ids[0] for d in decodes] + [0] * (batch - n)),  # [B]
            positions=positions,
            slot_mapping=context_slots.gather(1, positions[:, None]).squeeze(1),  # [B]
            context_slots=context_slots,
            mask=self._window_mask(positions, length)[:, None, None, :],  # [B, 1, 1, L]
            first=torch.zeros_like(positions) if window is None else (positions - window + 1).clamp(min=0),  # [B]
        )

    def _decode_forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(input_ids, positions, self.kv_caches, meta)

    def _load_adapters(self, loads: list[tuple[int, LoRARequest]]) -> None:
        assert self.lora is not None or not loads
        for slot, request in loads:
            self.lora.load(slot, self.adapters.get(request))  # type: ignore[union-attr]

    def _forward(self, items: list[StepItem]) -> torch.Tensor:
        """Hidden states [T, D] of the step's tokens; counts their experts on the device."""
        graphs, bucket = self.graphs, None
        lora = None if self.lora is None else self.lora.step(
            [item.lora_slot for item in items for _ in item.token_ids], self.device)
        if graphs is not None and lora is None and all(item.is_decode for item in items):
            bucket = graphs.bucket(len(items), max(item.start for item in items) + 1)
        if graphs is not None and bucket is not None:
            n = len(items)
            hidden, routed = graphs.run(self._decode_inputs(items, *bucket))  # [B, D], [L, B, k]
            hidden, routed = hidden[:n], routed[:, :n]  # the padding rows dropped
        else:
            input_ids, positions, meta = self._build(items)
            hidden, routed = self.model(input_ids, positions, self.kv_caches, meta, lora)  # [T, D], [L, T, k]
        flat = (routed + self._expert_offsets).flatten()  # [L * T * k] layer-major expert ids
        self.expert_counts.scatter_add_(0, flat, torch.ones_like(flat))  # no bincount: no host sync
        return hidden

    def execute(self, batch: list[ScheduledSeq], allowed: dict[int, torch.Tensor] | None = None,
                loads: list[tuple[int, LoRARequest]] | None = None) -> StepOutput:
        """Runs one step on every rank; reorders `batch` in place (decodes first). `allowed`: by
        seq_id, the grammar's bit mask of next tokens for constrained sequences that sample;
        `loads`: adapters to write into their slots first."""
        items = [
            StepItem(
                s.seq.token_ids[s.seq.num_computed_tokens : s.seq.num_computed_tokens + s.num_new_tokens],
                s.seq.num_computed_tokens,
                list(s.seq.block_table),
                s.seq.lora_slot,
            )
            for s in batch
        ]
        order = sorted(range(len(batch)), key=lambda i: not items[i].is_decode)  # stable: decodes first
        batch[:] = [batch[i] for i in order]
        items, loads = self.tp.broadcast(([items[i] for i in order], loads or []))
        self._load_adapters(loads)
        hidden = self._forward(items)
        sampled, rows_at, end = [], [], -1
        for s in batch:  # the last row of each item that samples, found on the host (no mask indexing)
            end += s.num_new_tokens
            if s.samples:
                sampled.append(s)
                rows_at.append(end)
        logits = self.model.logits(hidden[self._tensor(rows_at)])  # [B, V]
        rows = [
            SamplingRow(
                params=s.seq.params,
                prompt_ids=s.seq.prompt_ids,
                output_ids=s.seq.output_ids,
                generator=s.seq.generator,
                eos_id=self.eos_id,
                allowed=allowed.get(s.seq.seq_id) if allowed else None,
            )
            for s in sampled
        ]
        tokens = self.sampler(logits, rows) if rows else SamplerOutput([], None, None)
        return StepOutput(sampled, tokens)

    def serve_forever(self) -> None:
        """Ranks > 0: run each step rank 0 broadcasts, until it broadcasts None."""
        while (step := self.tp.broadcast(None)) is not None:
            items, loads = step
            self._load_adapters(loads)
            self._forward(items)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(config: EngineConfig, model_dir: Path) -> torch.dtype:
    """`auto`: the checkpoint's dtype on GPUs; bf16 on CPUs with oneDNN bf16 kernels, else fp32.

    NOTE: on CPU, plain PyTorch bf16 matrix-vector products run several times below memory
    bandwidth, so bf16 pays only with oneDNN-reordered weights (engine/linear.py); without
    those kernels fp32 decodes faster even though it reads twice the bytes.
    """
    if config.dtype != "auto":
        return _DTYPES[config.dtype]
    if torch.device(config.device).type == "cpu":
        return torch.bfloat16 if onednn_bf16_available() else torch.float32
    hf_config = model_dir / "config.json"
    saved = json.loads(hf_config.read_text()).get("torch_dtype") if hf_config.is_file() else None
    return _DTYPES.get(saved or "bfloat16", torch.bfloat16)


def build_runner(config: EngineConfig, tp: TPGroup, eos_id: int) -> ModelRunner:
    """Loads this rank's model and a KV pool sized from the memory budget (the same on every rank)."""
    model_dir = Path(config.model)
    device = tp.device  # this rank's (engine/parallel.py: rank_device)
    # Host threads serve CPU steps, and on a GPU the host-side work between kernel launches.
    torch.set_num_threads(step_threads(config.cpu_threads, tp.world_size))
    if device.type == "cpu":
        keep_freed_memory()
    dtype = resolve_dtype(config, model_dir)
    isa = resolve_isa(config.cpu_kernels, device, dtype)
    moe_backend = resolve_moe_backend(
        config.moe_backend, device, isa, load_model_config(model_dir)[0], config.tensor_parallel_size
    )
    with torch.device(device):
        model, cfg = load_model(
            model_dir,
            dtype,
            config.load_progress and tp.rank == 0,
            tp,
            config.quantization,
            config.fp8_per_channel,
            moe_backend,
            isa,
        )
        model.prepare(resolve_attention_backend(config.attention_backend, device, isa is not None))
    block_size = config.cache.block_size
    per_block = kv_bytes_per_block(cfg, model.local.n_kv_heads, block_size, dtype)
    budget = config.cache.kv_cache_bytes or int(available_memory(device) * config.cache.kv_cache_fraction)
    num_blocks = tp.min(budget // per_block)
    if num_blocks < 1:
        raise ValueError(f"KV cache budget of {budget} bytes is smaller than one block ({per_block} bytes)")
    log.info("rank %d: experts on the %s backend, CPU kernels: %s", tp.rank, moe_backend, isa or "off")
    log.info("rank %d: KV cache %d blocks x %d tokens (%.1f MiB)", tp.rank, num_blocks, block_size,
             num_blocks * per_block / 2**20)
    # NOTE: only the Triton MoE can be captured: the torch path reads expert counts on the host.
    capturable = device.type == "cuda" and moe_backend == "triton"
    graphs = config.decode_graphs if config.decode_graphs.max_batch and capturable else None
    runner = ModelRunner(model, num_blocks, block_size, device, eos_id, graphs, config.lora)
    runner.capture_graphs()  # every rank, in the same order: captured steps hold their collectives
    return runner


def build_worker_runner(config: EngineConfig, rank: int, world_size: int, init_method: str) -> ModelRunner:
    tp = init_group(rank, world_size, init_method, torch.device(config.device))
    return build_runner(config, tp, eos_id=-1)
