"""A sampler that keeps the logits it samples from, for tests that compare distributions."""

from __future__ import annotations

import torch

from engine.sampling import Sampler, SamplerOutput, SamplingRow


class RecordingSampler(Sampler):
    """Keeps every row of logits the engine samples from, keyed by (prompt, tokens so far)."""

    def __init__(self) -> None:
        super().__init__()
        self.logits: dict[tuple[tuple[int, ...], int], torch.Tensor] = {}

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        for i, row in enumerate(rows):
            self.logits[(tuple(row.prompt_ids), len(row.output_ids))] = logits[i].clone()
        return super().__call__(logits, rows)
