"""Turns a scheduled step into one flat model batch, runs the model and samples."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention import AttentionMetadata, PrefillChunk
from engine.model import Mixtral
from engine.model_config import ModelConfig
from engine.sampling import Sampler, SamplerOutput, SamplingRow
from engine.scheduler import ScheduledSeq


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return cfg.num_hidden_layers * 2 * block_size * cfg.num_key_value_heads * cfg.head_dim * elem


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo")


@dataclass
class StepOutput:
    sampled: list[ScheduledSeq]  # the items that produced a token, in `tokens` order
    tokens: SamplerOutput
    expert_counts: torch.Tensor  # [L, E] tokens routed to each expert this step


class ModelRunner:
    def __init__(
        self, model: Mixtral, num_blocks: int, block_size: int, device: torch.device, eos_id: int
    ) -> None:
        cfg = model.cfg
        self.model = model
        self.cfg = cfg
        self.block_size = block_size
        self.device = device
        self.eos_id = eos_id
        dtype = model.embed.dtype
        self.kv_caches = torch.zeros(  # [L, 2, S, KVH, hd]
            cfg.num_hidden_layers, 2, num_blocks * block_size, cfg.num_key_value_heads, cfg.head_dim,
            dtype=dtype, device=device,
        )
        self.sampler = Sampler()
        self._block_offsets = torch.arange(block_size, device=device)  # [bs]

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

    def _build(self, batch: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        decodes = [s for s in batch if s.num_new_tokens == 1 and s.seq.num_computed_tokens > 0]
        prefills = [s for s in batch if not (s.num_new_tokens == 1 and s.seq.num_computed_tokens > 0)]
        batch[:] = decodes + prefills  # decode tokens lead the flat batch
        ids: list[int] = []
        pos: list[int] = []
        for item in batch:
            start = item.seq.num_computed_tokens
            ids.extend(item.seq.token_ids[start : start + item.num_new_tokens])
            pos.extend(range(start, start + item.num_new_tokens))
        dev = self.device
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)  # [T]
        positions = torch.tensor(pos, dtype=torch.long, device=dev)  # [T]
        slot_parts: list[torch.Tensor] = []
        decode_slots = decode_mask = None
        if decodes:
            width = max(len(s.seq.block_table) for s in decodes)
            tables = torch.tensor(  # [B, nb], padded with block 0 (masked out below)
                [s.seq.block_table + [0] * (width - len(s.seq.block_table)) for s in decodes], device=dev
            )
            d_pos = positions[: len(decodes)]  # [B]
            length = int(d_pos.max()) + 1
            decode_slots = self._slots(tables, length)  # [B, L]
            decode_mask = self._window_mask(d_pos, length)[:, None, None, :]  # [B, 1, 1, L]
            slot_parts.append(decode_slots.gather(1, d_pos[:, None]).squeeze(1))  # [B]
        chunks: list[PrefillChunk] = []
        offset = len(decodes)
        for item in prefills:
            start, n = item.seq.num_computed_tokens, item.num_new_tokens
            table = torch.tensor(item.seq.block_table, device=dev)  # [nb]
            ctx_slots = self._slots(table, start + n)  # [C]
            slot_parts.append(ctx_slots[start:])
            window = self.cfg.sliding_window
            plain = start == 0 and (window is None or n <= window)
            mask = None if plain else self._window_mask(positions[offset : offset + n], start + n)  # [q, C]
            chunks.append(PrefillChunk(offset, n, ctx_slots, mask))
            offset += n
        meta = AttentionMetadata(
            slot_mapping=torch.cat(slot_parts),
            num_decode=len(decodes),
            decode_slots=decode_slots,
            decode_mask=decode_mask,
            prefills=chunks,
        )
        return input_ids, positions, meta

    def execute(self, batch: list[ScheduledSeq]) -> StepOutput:
        """Runs one step; reorders `batch` in place (decodes first)."""
        input_ids, positions, meta = self._build(batch)
        counts = torch.zeros(self.cfg.num_hidden_layers, self.cfg.num_local_experts, dtype=torch.long)
        hidden = self.model(input_ids, positions, self.kv_caches, meta, counts)  # [T, D]
        ends = torch.tensor([s.num_new_tokens for s in batch], device=self.device).cumsum(0) - 1  # [N]
        sampled = [s for s in batch if s.samples]
        keep = torch.tensor([s.samples for s in batch], device=self.device)  # [N]
        logits = self.model.logits(hidden[ends[keep]])  # [B, V]
        rows = [
            SamplingRow(
                params=s.seq.params,
                prompt_ids=s.seq.prompt_ids,
                output_ids=s.seq.output_ids,
                generator=s.seq.generator,
                eos_id=self.eos_id,
            )
            for s in sampled
        ]
        tokens = self.sampler(logits, rows) if rows else SamplerOutput([], None, None)
        return StepOutput(sampled, tokens, counts)
