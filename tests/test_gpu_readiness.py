"""GPU readiness, checked on CPU: each rank's device, collectives on the group's device, the
rendezvous address, torch._scaled_mm's preconditions and the fused-MoE tiles' shared memory.
(The Triton kernels and the host-sync guard over the graphed decode path: test_triton_gpu_paths.py;
the whole check on a GPU: benchmarks/gpu_check.py.)"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

import engine.parallel as parallel
from engine.config import EngineConfig
from engine.fused_moe_triton import _TILES_16BIT, _TILES_FP8, SMEM_BUDGET, pipeline_stages
from engine.linear import check_scaled_mm
from engine.outputs import EngineDeadError
from engine.parallel import TPGroup, init_group, rank_device
from engine.ranks import RankPlacement, start_ranks


def test_rank_device_map() -> None:
    assert rank_device("cpu", 3, own_devices=False) == torch.device("cpu")
    # Local ranks share the host's GPUs: rank r takes the r-th after the configured one.
    assert [rank_device("cuda", r, own_devices=False) for r in range(4)] == [torch.device("cuda", r) for r in range(4)]
    assert rank_device("cuda:2", 1, own_devices=False) == torch.device("cuda", 3)
    # Ray shows each rank its own GPU: every rank uses the configured device.
    assert rank_device("cuda", 3, own_devices=True) == torch.device("cuda")


def test_a_rank_without_its_gpu_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"rank 1 needs cuda:1 but \d+ GPU\(s\) are visible"):
        init_group(1, 2, "tcp://127.0.0.1:1", torch.device("cuda", 1 + torch.cuda.device_count()))


class _DeviceCheckingDist:
    """Stands in for torch.distributed: every collective's tensor must be on the group's device."""

    ReduceOp = torch.distributed.ReduceOp

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.calls = 0

    def all_reduce(self, tensor: torch.Tensor, op: Any = None, group: Any = None) -> None:
        assert tensor.device == self.device, f"collective on {tensor.device}, group on {self.device}"
        self.calls += 1


def test_collectives_use_tensors_on_the_group_device(monkeypatch: pytest.MonkeyPatch) -> None:
    device = torch.device("cpu")
    fake = _DeviceCheckingDist(device)
    monkeypatch.setattr(parallel, "dist", fake)
    tp = TPGroup(rank=0, world_size=2, group=object(), device=device)
    assert tp.min(7) == 7
    tp.all_reduce(torch.ones(3, device=device))
    assert fake.calls == 2
    # The group records the device it was made for (world size 1 here: no process group needed).
    assert init_group(0, 1, "", torch.device("cpu")).device == torch.device("cpu")


class _DeadRank:
    def is_alive(self) -> bool:
        return False

    def stop(self) -> None:
        pass


@pytest.mark.parametrize(("own_devices", "want"), [(False, ["cuda:2", "cuda:3"]), (True, ["cuda:1", "cuda:1"])])
def test_ranks_meet_at_the_placement_host_with_their_own_device(own_devices: bool, want: list[str]) -> None:
    launched: list[tuple[str, str]] = []

    def launcher(rank: int, world_size: int, init_method: str, config_json: str) -> _DeadRank:
        launched.append((init_method, json.loads(config_json)["device"]))
        return _DeadRank()

    config = EngineConfig(device="cuda:1", tensor_parallel_size=3)
    with pytest.raises((EngineDeadError, ValueError)):  # dead ranks, or (no GPU here) rank 0's own device
        start_ranks(config, launcher, RankPlacement(host="127.0.0.2", own_devices=own_devices))
    assert [device for _, device in launched] == want
    assert all(init.startswith("tcp://127.0.0.2:") for init, _ in launched)


def test_scaled_mm_preconditions(monkeypatch: pytest.MonkeyPatch) -> None:
    check_scaled_mm(torch.device("cpu"))  # PyTorch's CPU kernel runs any fp8 weight
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match=r"A100.*compute capability 8\.0.*needs 8\.9 or newer"):
        check_scaled_mm(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_scaled_mm(torch.device("cuda"))


@pytest.mark.parametrize(("a_bytes", "b_bytes"), [(4, 4), (4, 1), (2, 2), (2, 1), (1, 1)])
def test_moe_tiles_fit_shared_memory(a_bytes: int, b_bytes: int) -> None:
    """Every tile of the table, with fp32 / bf16 / fp8 operands, fits A100's and Hopper's shared memory."""
    assert SMEM_BUDGET <= 164 * 1024
    for _, cfg in _TILES_16BIT + _TILES_FP8:
        stages = pipeline_stages(cfg, a_bytes, b_bytes)
        assert 1 <= stages <= cfg["num_stages"]
        assert stages * cfg["BLOCK_K"] * (cfg["BLOCK_M"] * a_bytes + cfg["BLOCK_N"] * b_bytes) <= SMEM_BUDGET
    # Every table's tile keeps its full pipeline with the operands it is chosen for (16-bit, or
    # fp8 x fp8); fp32 128x256x64 gives up stages (3 would need 288 KiB).
    assert all(pipeline_stages(cfg, 2, 2) == cfg["num_stages"] for _, cfg in _TILES_16BIT)
    assert all(pipeline_stages(cfg, 1, 1) == cfg["num_stages"] for _, cfg in _TILES_FP8)
    assert pipeline_stages(_TILES_16BIT[-1][1], 4, 4) == 1


def test_gpu_check_runs_its_cpu_side_checks_here(tmp_path) -> None:
    """benchmarks/gpu_check.py on a CPU-only machine: says so, runs the kernels small under the
    interpreter (the tiny model's tokens through them equal PyTorch's ops) and exits 0."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "gpu_check.json"
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_check.py"), "--json-out", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=root)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "no GPU" in run.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {r["check"].split()[0] for r in rows} >= {"e2e", "moe", "fp8", "attention"}
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
