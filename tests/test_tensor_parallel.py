"""Tensor parallelism on CPU: 2 ranks joined with gloo generate exactly what one process does."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from engine import LLM, SamplingParams
from engine.checkpoint import PRESETS
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.model_config import ModelConfig
from engine.outputs import EngineDeadError
from engine.parallel import LocalShape, TPGroup, check_tp_size
from engine.ranks import LocalProcess, free_port
from engine.shm_channel import SLOT_BYTES

MQA = ModelConfig(hidden_size=96, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=1, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                  vocab_size=32000, max_position_embeddings=2048)
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
PROMPTS = [[1, 2, 3, 4, 5], [1, *range(100, 160)], [1, 900]]


def _generate(ckpt, tp: int, layout_note: str = "") -> tuple[list[list[int]], LLM]:
    llm = LLM(ckpt, dtype="float32", tensor_parallel_size=tp, cache={"kv_cache_bytes": 8 << 20},
              load_progress=False)
    return [r.token_ids for r in llm.generate(PROMPTS, GREEDY)], llm


@pytest.mark.parametrize(("cfg", "layout"), [(PRESETS["tiny"], "hf"), (MQA, "mistral")], ids=["gqa-hf", "mqa-mistral"])
def test_tp2_matches_tp1(make_checkpoint, cfg: ModelConfig, layout: str) -> None:
    threads = torch.get_num_threads()
    ckpt = make_checkpoint(cfg, layout=layout)
    single, _ = _generate(ckpt, 1)
    try:
        split, llm = _generate(ckpt, 2)
        # Each rank really holds half: half the heads (or the one shared KV head) and half of every expert.
        local = llm.engine.model.local
        assert local.n_heads == cfg.num_attention_heads // 2
        assert llm.engine.model.layers[0].moe.w13.shape[1] == cfg.intermediate_size  # 2I / 2
        assert split == single
        llm.engine.shutdown()
    finally:
        torch.set_num_threads(threads)


def test_ranks_leave_cleanly_when_the_program_ends(make_checkpoint) -> None:
    """A program that never calls shutdown: at exit its local rank is stopped, not killed, and
    neither Python's resource tracker nor /dev/shm is left with anything of the group's."""
    script = (
        "from engine import LLM, SamplingParams\n"
        f"llm = LLM({str(make_checkpoint())!r}, dtype='float32', tensor_parallel_size=2, load_progress=False,\n"
        "          cache={'kv_cache_bytes': 8 << 20})\n"
        "print(llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=2))[0].token_ids)\n"
    )
    before = set(Path("/dev/shm").glob("mixtral-serve-tp-*"))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("[")
    for trace in ("resource_tracker", "leaked", "Traceback"):
        assert trace not in run.stderr, run.stderr
    assert set(Path("/dev/shm").glob("mixtral-serve-tp-*")) == before


def test_dead_rank_is_reported_not_hung(make_checkpoint) -> None:
    threads = torch.get_num_threads()
    try:
        _, llm = _generate(make_checkpoint(), 2)
        worker = llm.engine.workers[0]
        worker.process.kill()
        worker.process.join(timeout=10)
        t = time.monotonic()
        with pytest.raises(EngineDeadError, match=r"rank\(s\) \[1\] died"):
            llm.generate(PROMPTS, GREEDY)
        assert time.monotonic() - t < 5
        llm.engine.shutdown()
    finally:
        torch.set_num_threads(threads)


def _exit_at_once() -> None:
    raise SystemExit(3)  # a rank that crashes while starting, before it joins the group


def _crashing_launcher(rank: int, world_size: int, init_method: str, config_json: str) -> LocalProcess:
    process = torch.multiprocessing.get_context("spawn").Process(target=_exit_at_once, daemon=True)
    process.start()
    return LocalProcess(process)


def test_rank_dying_at_start_is_reported_not_hung(make_checkpoint) -> None:
    """Rank 0 would wait out the rendezvous timeout (30 minutes) for a rank that never joins."""
    threads = torch.get_num_threads()
    config = EngineConfig(model=str(make_checkpoint()), dtype="float32", tensor_parallel_size=2, load_progress=False)
    t = time.monotonic()
    try:
        with pytest.raises(EngineDeadError, match=r"rank\(s\) \[1\] died before joining"):
            LLMEngine(config, launcher=_crashing_launcher)
    finally:
        torch.set_num_threads(threads)
    assert time.monotonic() - t < 30


def test_sharding_rules() -> None:
    cfg = PRESETS["bench"]  # 16 heads, 4 KV heads, intermediate 3584
    check_tp_size(cfg, 4)
    with pytest.raises(ValueError, match="does not divide the 16 attention heads"):
        check_tp_size(cfg, 3)
    with pytest.raises(ValueError, match="must divide one another"):
        check_tp_size(cfg.model_copy(update={"num_key_value_heads": 8, "num_attention_heads": 24}), 6)
    # 8 ranks, 4 KV heads: ranks 2k and 2k+1 both keep KV head k, the one their query heads use.
    shapes = [LocalShape.of(cfg, TPGroup(rank=r, world_size=8)) for r in range(8)]
    assert [s.kv_head_offset for s in shapes] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert all(s.n_heads == 2 and s.n_kv_heads == 1 for s in shapes)
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    for s in shapes:  # every local query head maps to the local KV head
        assert {(s.rank * s.n_heads + h) // group for h in range(s.n_heads)} == {s.kv_head_offset}
    assert shapes[3].shard("model.layers.0.block_sparse_moe.experts.1.w2.weight", cfg) == (1, 1344, 1792)
    assert shapes[3].shard("model.layers.0.self_attn.o_proj.weight", cfg) == (1, 384, 512)
    assert shapes[3].shard("model.layers.0.block_sparse_moe.gate.weight", cfg) is None


def _channel_rank(rank: int, port: int, results: Any) -> None:
    """One rank of a 2-rank gloo group exercising the shared-memory channel."""
    from engine.parallel import init_group

    tp = init_group(rank, 2, f"tcp://127.0.0.1:{port}", torch.device("cpu"))
    assert tp.channel is not None
    out: dict[str, Any] = {}  # plain values: a rank's tensors do not outlive it in a queue
    for dtype, bits in ((torch.bfloat16, torch.int16), (torch.float32, torch.int32)):
        x = torch.full((3, 5), float(rank + 1), dtype=dtype) / 3
        out[str(dtype)] = tp.all_reduce(x).view(bits).tolist()  # the reduced bits
    big = torch.ones(SLOT_BYTES // 4 + 1)  # one element over a slot: gloo carries it
    out["big"] = tp.all_reduce(big * (rank + 1)).unique().tolist()
    out["small_obj"] = tp.broadcast({"step": 7, "rank": rank})
    out["big_obj"] = tp.broadcast(b"x" * (SLOT_BYTES + 1) if rank == 0 else None)
    results.put((rank, out))
    if rank == 1:
        return  # leaves without taking part in the next all-reduce
    t = time.monotonic()
    try:
        tp.all_reduce(torch.ones(4))
        results.put(("rank0", "no error"))
    except EngineDeadError as err:
        results.put(("rank0", f"{err} after {time.monotonic() - t:.1f}s"))
    tp.close()


def test_shm_channel_reduces_and_broadcasts_and_notices_a_dead_rank() -> None:
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_channel_rank, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=120) for _ in range(3))
    for p in procs:
        p.join(timeout=60)
    a, b = got[0], got[1]
    for dtype, bits in ((torch.bfloat16, torch.int16), (torch.float32, torch.int32)):
        assert a[str(dtype)] == b[str(dtype)]  # the same bits on every rank
        summed = torch.tensor(a[str(dtype)], dtype=bits).view(dtype).float()
        assert torch.allclose(summed, torch.full((3, 5), 1.0), atol=1e-2)  # 1/3 + 2/3
    assert a["big"] == b["big"] == [3.0]
    assert a["small_obj"] == b["small_obj"] == {"step": 7, "rank": 0}
    assert a["big_obj"] == b["big_obj"] == b"x" * (SLOT_BYTES + 1)
    message = got["rank0"]
    assert "rank(s) [1] died" in message, message
    assert float(message.rsplit(" ", 1)[1].rstrip("s")) < 10
