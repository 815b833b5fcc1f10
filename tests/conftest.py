"""Shared fixtures: random-weight checkpoints written once per test session."""

from __future__ import annotations

import os
import sys

# NOTE: Triton decides when it is first imported whether kernels run in its interpreter, and any
# test module may import it first (transformers does). Without a GPU they can only be interpreted.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """The tiny model gains nothing from intra-op threads, and on a busy 2-core machine their
    spin-waits make every step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_exit_status: list[int] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _exit_status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave with pytest's status once everything is reported, without interpreter finalisation.

    NOTE: native libraries the suite loads in-process (Ray's core worker, gloo, oneDNN and OpenMP
    thread pools, Triton's interpreter) can crash while Python tears itself down: seen once in
    three full runs, SIGSEGV after "438 passed". Every result is final by now, so the process
    exits with pytest's own status (a failed test still fails the run) and skips the teardown.
    """
    if _exit_status:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status[0])
