"""Shared fixtures: random-weight checkpoints written once per test session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from engine.checkpoint import PRESETS, write_checkpoint
from engine.model_config import ModelConfig

CheckpointFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> CheckpointFactory:
    """`make_checkpoint(cfg, layout="hf", dtype="float32", seed=0, shard_mb=None)` -> folder (cached)."""
    cache: dict[tuple, Path] = {}

    def make(cfg: ModelConfig = PRESETS["tiny"], layout: str = "hf", dtype: str = "float32",
             seed: int = 0, shard_mb: int | None = None) -> Path:
        key = (cfg.model_dump_json(), layout, dtype, seed, shard_mb)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"ckpt-{layout}")
            cache[key] = write_checkpoint(out, cfg, layout=layout, seed=seed, dtype=dtype, shard_mb=shard_mb)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(make_checkpoint: CheckpointFactory) -> Path:
    return make_checkpoint()
