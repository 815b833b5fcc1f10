"""`bench serve` against a real OpenAI-compatible server: a small FastAPI app in this module that
streams `/v1/completions` and `/v1/chat/completions` from the real AsyncEngine (tiny preset),
run by uvicorn on 127.0.0.1 in a background thread. Prompts carrying a marker word are answered
with 429 / 503 / 500 so rejection and failure accounting can be checked.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import uvicorn
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from benchmarks.serve_bench import BenchConfig, run_benchmark
from benchmarks.serve_cost import Pricing, cost_of
from benchmarks.serve_report import PNG_NAMES, BenchResult, LoadLevel, RequestResult, RunResult, pick_best, summarize
from engine.async_engine import AsyncEngine
from engine.checkpoint import PRESETS, write_checkpoint
from engine.config import EngineConfig
from engine.outputs import RequestError
from engine.sampling_params import SamplingParams
from mixtral_serve.cli import main as cli_main

MODEL = "tiny-test"
MAX_MODEL_LEN = PRESETS["tiny"].max_position_embeddings
MARKERS = {"REJECT-ME": 429, "OVERLOAD-ME": 503, "FAIL-ME": 500}
BREAK_MARKER = "BREAK-ME"  # fails inside the stream, after its first token
API_KEY = "test-key"  # completions refuse any other key sent (none sent is let through)
LATE_END_MARKER = "LATE-END"  # the response's body ends 50 ms after its `[DONE]`
CLIENT_PORTS: list[int] = []  # the client's port of each completion request, in order
PNG_HEADER = b"\x89PNG\r\n\x1a\n"


def build_app(ckpt: Path) -> FastAPI:
    """OpenAI's streaming wire format over the real engine, at /v1/... and /<tier>/v1/..."""
    engines: list[AsyncEngine] = []
    ids = itertools.count()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engines.append(AsyncEngine(EngineConfig(model=str(ckpt), dtype="float32", cache={"kv_cache_bytes": 64 << 20},
                                                load_progress=False)))
        yield
        await engines[0].shutdown()

    app = FastAPI(lifespan=lifespan)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "test", "param": None, "code": status}}, status)

    async def respond(body: dict[str, Any], text: str, prompt_ids: list[int], chat: bool) -> Any:
        for marker, status in MARKERS.items():
            if marker in text:
                return error(status, f"marker {marker}")
        engine = engines[0]
        params = SamplingParams(temperature=body.get("temperature", 1.0), max_tokens=body.get("max_tokens", 16),
                                ignore_eos=body.get("ignore_eos", False))
        try:
            engine.validate(prompt_ids, params)
        except RequestError as err:
            return error(400, str(err))
        rid = f"cmpl-{next(ids)}"
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": 0,
                "model": MODEL}

        def sse(payload: dict[str, Any]) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        async def events() -> AsyncIterator[str]:
            if chat:  # like OpenAI: a role header before any token (must not count as the first token)
                yield sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                "finish_reason": None}]})
            last = None
            async for out in engine.generate(rid, prompt_ids, params):
                last = out
                for c in out.choices:
                    if c.text or c.finish_reason:
                        part = {"delta": {"content": c.text}} if chat else {"text": c.text}
                        yield sse({**head, "choices": [{"index": 0, **part, "finish_reason": c.finish_reason}]})
                if BREAK_MARKER in text:  # an error event after the first token, as a failing stream sends it
                    yield sse({"error": {"message": f"marker {BREAK_MARKER}", "type": "test", "code": 500}})
                    return
            if (body.get("stream_options") or {}).get("include_usage") and last is not None:
                usage = {"prompt_tokens": last.num_prompt_tokens, "completion_tokens": last.num_output_tokens,
                         "total_tokens": last.num_prompt_tokens + last.num_output_tokens}
                yield sse({**head, "choices": [], "usage": usage})
            yield "data: [DONE]\n\n"
            if LATE_END_MARKER in text:  # the body's end arrives on its own, as through a proxy
                await asyncio.sleep(0.05)

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/v1/models")
    @app.get("/{tier}/v1/models")
    async def models(tier: str | None = None) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "test",
                                            "max_model_len": MAX_MODEL_LEN}]}

    @app.post("/v1/completions")
    @app.post("/{tier}/v1/completions")
    async def completions(request: Request, tier: str | None = None) -> Any:
        if request.headers.get("authorization", f"Bearer {API_KEY}") != f"Bearer {API_KEY}":
            return error(401, "wrong API key")
        CLIENT_PORTS.append(request.client.port if request.client else 0)
        body = await request.json()
        return await respond(body, body["prompt"], engines[0].tokenizer.encode(body["prompt"], add_bos=True), False)

    @app.post("/v1/chat/completions")
    @app.post("/{tier}/v1/chat/completions")
    async def chat(request: Request, tier: str | None = None) -> Any:
        body = await request.json()
        text = " ".join(m["content"] for m in body["messages"])
        return await respond(body, text, engines[0].tokenizer.apply_chat_template(body["messages"]), True)

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model gains nothing from intra-op threads; the client needs a core
    ckpt = write_checkpoint(tmp_path_factory.mktemp("bench-serve-ckpt"), PRESETS["tiny"], dtype="float32")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(ckpt), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="test-openai-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "test server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(timeout=30)
    torch.set_num_threads(threads)


def bench(base_url: str, **kw: Any) -> BenchResult:
    return asyncio.run(run_benchmark(BenchConfig(base_url=base_url, progress=False, **kw)))


def check_run(run: RunResult) -> None:
    """What holds for every run: counts add up, each request's timings are consistent."""
    assert run.issued == run.successful + run.failed + run.rejected == len(run.requests)
    for dist in (run.ttft_ms, run.tpot_ms, run.itl_ms, run.e2e_ms):
        if dist is not None:
            assert 0 <= dist.p50 <= dist.p90 <= dist.p99 <= dist.max
    for r in run.requests:
        if r.status == "ok":
            assert r.ttft_ms is not None and 0 < r.ttft_ms <= r.e2e_ms
            assert len(r.itl_ms) < max(r.output_tokens, 1) and all(g >= 0 for g in r.itl_ms)
            assert r.ttft_ms + sum(r.itl_ms) <= r.e2e_ms + 1e-6


def test_closed_loop_run_with_reports(base_url: str, tmp_path: Path) -> None:
    out = tmp_path / "run" / "result.json"
    result = bench(base_url, concurrency=4, num_requests=12, input_len=32, output_len=8, warmup=2,
                   slo={"ttft_ms": 60_000, "tpot_ms": 60_000}, out=out)
    (run,) = result.runs
    check_run(run)
    assert run.model == MODEL and run.warmup_failed == 0
    assert run.successful == run.issued == 12 and run.failed == run.rejected == 0
    assert run.output_tokens == 12 * 8 and all(r.output_tokens == 8 for r in run.requests)
    # n random words + BOS are exactly n + 1 tokens with Mistral's tokenizer
    assert all(r.input_tokens == 32 for r in run.requests)
    assert run.output_tok_s == pytest.approx(96 / run.duration_s)
    assert run.total_tok_s == pytest.approx((96 + 12 * 32) / run.duration_s)
    assert run.per_session_tok_s is not None and run.per_session_tok_s > 0
    assert run.goodput_req_s == pytest.approx(run.request_throughput) and run.meets_slo
    assert max(p.in_flight for p in run.timeline) <= 4 and sum(p.output_tok_s for p in run.timeline) > 0
    assert BenchResult.model_validate_json(out.read_text()).runs[0].output_tokens == 96
    for name in PNG_NAMES[:2]:
        png = out.with_name(f"result_{name}.png").read_bytes()
        assert png.startswith(PNG_HEADER) and len(png) > 1000
    assert not out.with_name("result_sweep.png").exists()  # no sweep, no sweep plot


def test_chat_endpoint_skips_role_header(base_url: str) -> None:
    (run,) = bench(base_url, endpoint="chat", concurrency=2, num_requests=4, input_len=16, output_len=6,
                   warmup=0).runs
    check_run(run)
    assert run.successful == 4 and run.output_tokens == 24
    # the chat template adds [INST] ... [/INST]: more than the 16 words' tokens
    assert all(r.input_tokens is not None and r.input_tokens > 16 for r in run.requests)


def test_poisson_arrivals_are_reproducible(base_url: str) -> None:
    def schedule(seed: int) -> list[float]:
        (run,) = bench(base_url, request_rate=25.0, seed=seed, num_requests=8, input_len=8, output_len=3,
                       warmup=0).runs
        check_run(run)
        assert run.successful == 8 and run.load.kind == "request_rate"
        scheduled = [r.scheduled_s for r in run.requests if r.scheduled_s is not None]
        assert len(scheduled) == 8
        assert all(r.start_s >= at - 1e-3 for r, at in zip(run.requests, scheduled))  # never early
        return scheduled

    first = schedule(seed=7)
    assert first[0] == 0.0 and first == sorted(first) and first[-1] > 0
    assert schedule(seed=7) == first
    assert schedule(seed=8) != first


def test_dataset_with_rejected_and_failed_requests(base_url: str, tmp_path: Path) -> None:
    rows = [{"prompt": "The capital of France is", "max_tokens": 5}, {"prompt": "REJECT-ME please"},
            {"prompt": "one two three", "max_tokens": 6}, {"prompt": "FAIL-ME now", "max_tokens": 3},
            {"prompt": "OVERLOAD-ME later"}, {"prompt": "Hello world", "max_tokens": 7},
            {"prompt": "BREAK-ME midway", "max_tokens": 4}]
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (run,) = bench(base_url, dataset=dataset, concurrency=3, num_requests=7, warmup=0, output_len=4,
                   slo={"ttft_ms": 60_000}).runs
    check_run(run)
    assert (run.successful, run.failed, run.rejected) == (3, 2, 2)
    assert run.output_tokens == 5 + 6 + 7
    assert [r.status for r in run.requests] == ["ok", "rejected", "ok", "failed", "rejected", "ok", "failed"]
    assert run.errors["HTTP 429: marker REJECT-ME"] == 1 and run.errors["HTTP 500: marker FAIL-ME"] == 1
    assert run.errors["StreamError: marker BREAK-ME"] == 1  # a stream that broke after its first token
    assert run.slo_attainment == pytest.approx(3 / 7) and not run.meets_slo


def test_sequential_requests_keep_their_connection(base_url: str, tmp_path: Path) -> None:
    """One user's requests go over one kept-alive connection: the client reads each stream to its
    end, where leaving the body's end unread after `[DONE]` (it may come in a later packet, as
    through Serve's proxy) would close the connection and open a new one for each request."""
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text("\n".join(json.dumps({"prompt": f"{LATE_END_MARKER} {i}", "max_tokens": 3}) for i in range(5)))
    CLIENT_PORTS.clear()
    (run,) = bench(base_url, dataset=dataset, concurrency=1, num_requests=4, warmup=1).runs
    assert run.successful == 4 and len(CLIENT_PORTS) == 5
    assert len(set(CLIENT_PORTS)) == 1, CLIENT_PORTS


def test_the_api_key_goes_as_a_bearer_token(base_url: str) -> None:
    (run,) = bench(base_url, api_key=API_KEY, concurrency=2, num_requests=2, warmup=0, output_len=3).runs
    assert run.successful == 2 and run.output_tokens == 6
    (run,) = bench(base_url, api_key="not-the-key", concurrency=2, num_requests=2, warmup=0, output_len=3).runs
    assert run.failed == 2 and run.errors == {"HTTP 401: wrong API key": 2}


def test_prompt_fills_the_context(base_url: str) -> None:
    (run,) = bench(base_url, input_len="max", output_len=4, num_requests=1, warmup=0).runs
    check_run(run)
    assert run.successful == 1
    tokens = run.requests[0].input_tokens
    assert tokens is not None and 0.95 * MAX_MODEL_LEN < tokens <= MAX_MODEL_LEN - 4


def test_closed_port_fails_every_request_without_hanging(tmp_path: Path) -> None:
    t = time.monotonic()
    result = bench(f"http://127.0.0.1:{free_port()}/v1", model="x", concurrency=2, num_requests=5, output_len=4,
                   warmup=1, timeout_s=10, out=tmp_path / "dead")
    (run,) = result.runs
    check_run(run)
    assert run.failed == run.issued == 5 and run.warmup_failed == 1 and run.output_tokens == 0
    assert run.ttft_ms is None and run.goodput_req_s == 0 and not run.meets_slo
    assert all(e.startswith("connection error") for e in run.errors)
    assert (tmp_path / "dead" / "result.json").is_file()  # reports still written, from no data
    assert time.monotonic() - t < 10


def test_cli_sweep_over_tiers(base_url: str, tmp_path: Path) -> None:
    out = tmp_path / "sweep" / "result.json"
    done = subprocess.run(
        [sys.executable, "-m", "mixtral_serve.cli", "bench", "serve", "--base-url", base_url, "--tier", "alpha,beta",
         "--sweep", "concurrency=1,2,4", "--num-requests", "4", "--input-len", "16", "--output-len", "6",
         "--slo", "ttft_ms=60000", "--slo", "tpot_ms=60000", "--warmup", "1", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "best load within the SLOs" in done.stdout
    result = BenchResult.model_validate_json(out.read_text())
    assert [(r.tier, r.load.value) for r in result.runs] == [(t, c) for t in ("alpha", "beta") for c in (1, 2, 4)]
    for run in result.runs:
        check_run(run)
        assert run.base_url.endswith(f"/{run.tier}/v1") and run.successful == 4 and run.output_tokens == 24
    # generous SLOs: every level passes, so the best is the highest load of each tier
    assert [(b.tier, b.load.value if b.load else None) for b in result.best] == [("alpha", 4), ("beta", 4)]
    for name in PNG_NAMES:
        assert out.with_name(f"result_{name}.png").read_bytes().startswith(PNG_HEADER)


def test_cli_rejects_bad_arguments(base_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["bench", "serve", "--base-url", base_url, "--slo", "ttft_ms=5", "--input-len-range", "9:3"])
    assert exit_info.value.code == 2 and "input_len_range must be a:b" in capsys.readouterr().err


def test_best_load_stops_at_the_first_level_that_misses_the_slos() -> None:
    def level(tier: str, concurrency: int, ttft_ms: float) -> RunResult:
        records = [RequestResult(index=i, start_s=0.0, status="ok", input_tokens=4, output_tokens=2,
                                 ttft_ms=ttft_ms, e2e_ms=ttft_ms + 10, itl_ms=[10.0]) for i in range(4)]
        return summarize(records, tier=tier, base_url="u", model="m", duration_s=1.0, warmup_failed=0,
                         load=LoadLevel(kind="concurrency", value=concurrency), slo={"ttft_ms": 100},
                         slo_attainment=0.9)

    runs = [level("a", 1, 50), level("a", 2, 150), level("a", 4, 50),  # a pass after a miss is noise
            level("b", 1, 50), level("b", 2, 60), level("c", 1, 500)]
    assert [b.load.value if b.load else None for b in pick_best(runs)] == [1, 2, None]


def test_duration_caps_the_run(base_url: str) -> None:
    (run,) = bench(base_url, concurrency=2, duration_s=1.0, input_len=8, output_len=4, warmup=0).runs
    check_run(run)
    assert run.issued >= 2 and run.successful == run.issued
    assert all(r.start_s < 1.0 for r in run.requests) and 1.0 <= run.duration_s < 10


def test_request_timeout_ends_a_long_stream(base_url: str) -> None:
    t = time.monotonic()
    (run,) = bench(base_url, concurrency=2, num_requests=2, input_len=8, output_len=3000, warmup=0,
                   timeout_s=0.5).runs
    check_run(run)
    assert run.failed == 2 and run.errors == {"timeout after 0.5s": 2}
    assert time.monotonic() - t < 5


def test_vllm_flag_names_run_the_same_benchmark(base_url: str, tmp_path: Path) -> None:
    """vLLM `bench serve`'s spelling: a base URL without /v1, --max-concurrency, --num-prompts,
    --random-*-len, --goodput (with an ITL objective), --save-result into --result-dir."""
    root = base_url.removesuffix("/v1")
    done = subprocess.run(
        [sys.executable, "-m", "mixtral_serve.cli", "bench", "serve", "--base-url", root, "--max-concurrency", "2",
         "--num-prompts", "4", "--random-input-len", "16", "--random-output-len", "6", "--warmup", "0",
         "--goodput", "ttft:60000", "itl:0.001", "--percentile-metrics", "ttft,itl", "--save-result",
         "--result-dir", str(tmp_path), "--result-filename", "run.json", "--disable-tqdm"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = BenchResult.model_validate_json((tmp_path / "run.json").read_text())
    run = result.runs[0]
    assert run.base_url == base_url and run.load.value == 2 and run.successful == 4
    assert run.output_tokens == 4 * 6
    assert run.slo == {"ttft_ms": 60000, "itl_ms": 0.001}
    assert run.slo_attainment == 0  # no stream keeps every gap under a microsecond
    assert "ITL ms" in done.stdout and "TPOT ms" not in done.stdout  # the rows asked for


def test_cost_per_million_tokens_splits_prompt_and_generation() -> None:
    """Two requests of 100 prompt and 50 generated tokens, a quarter of each request's time before
    its first token, in one hour on 2 GPUs at $3: $6 in all, $1.50 on 200 prompt tokens."""
    records = [RequestResult(index=i, start_s=0.0, status="ok", input_tokens=100, output_tokens=50,
                             ttft_ms=250.0, e2e_ms=1000.0, itl_ms=[15.0] * 49) for i in range(2)]
    records.append(RequestResult(index=2, start_s=0.0, status="failed", e2e_ms=5.0))  # neither tokens nor time
    pricing = Pricing(gpu_hour_usd=3.0, gpus_per_replica={"big": 2.0}, blend=(4.0, 1.0))
    run = summarize(records, tier="big", base_url="u", model="m", duration_s=3600.0, warmup_failed=0,
                    load=LoadLevel(kind="concurrency", value=2), slo={}, slo_attainment=0.9, pricing=pricing)
    cost = run.cost
    assert cost is not None and cost.hour_usd == 6.0 and cost.prompt_share == 0.25
    assert cost.usd_per_m_prompt == pytest.approx(1.5 / 200 * 1e6)
    assert cost.usd_per_m_generated == pytest.approx(4.5 / 100 * 1e6)
    assert cost.usd_per_m_blended == pytest.approx((4 * 7500 + 45000) / 5)
    assert cost.usd_per_m_tokens == pytest.approx(6.0 / 300 * 1e6)  # the whole run over all 300 tokens
    # A tier the config does not name is priced at --gpus-per-replica, times the replicas.
    other = Pricing(gpu_hour_usd=3.0, default_gpus=1.0, replicas=2)
    assert cost_of(records, 3600.0, other, "small").hour_usd == 6.0


def test_cli_prices_each_tier_from_the_config_and_falls_with_load(base_url: str, tmp_path: Path) -> None:
    config = tmp_path / "gpu.yaml"
    config.write_text(yaml.safe_dump({"applications": [{"name": "m", "import_path": "deployments.app:build_app", "args": {
        "default_tier": "alpha", "tiers": {"alpha": {"deployment": {"num_gpus": 4}},
                                           "beta": {"deployment": {"num_gpus": 1}}}}}]}))
    out = tmp_path / "priced.json"
    done = subprocess.run(
        [sys.executable, "-m", "mixtral_serve.cli", "bench", "serve", "--base-url", base_url, "--tier", "alpha,beta",
         # Enough work that batching four users, not timing noise, decides the two runs' lengths.
         "--sweep", "concurrency=1,4", "--num-requests", "16", "--input-len", "16", "--output-len", "32", "--warmup", "2",
         "--gpu-hour-usd", "2.5", "--config", str(config), "--price-blend", "3:1", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "$/1M prompt/gen/blend" in done.stdout
    result = BenchResult.model_validate_json(out.read_text())
    hours = {run.tier: run.cost.hour_usd for run in result.runs if run.cost}
    assert hours == {"alpha": 10.0, "beta": 2.5}
    for tier in ("alpha", "beta"):
        light, heavy = (r.cost for r in result.runs if r.tier == tier)
        assert light and heavy and light.usd_per_m_blended and heavy.usd_per_m_blended
        assert light.usd_per_m_tokens and heavy.usd_per_m_tokens
        assert heavy.usd_per_m_tokens < light.usd_per_m_tokens  # four users share the same hour
    cpu_only = config.with_name("cpu.yaml")
    cpu_only.write_text(config.read_text().replace("num_gpus: 4", "num_gpus: 0"))
    refused = subprocess.run(
        [sys.executable, "-m", "mixtral_serve.cli", "bench", "serve", "--base-url", base_url, "--gpu-hour-usd", "1",
         "--config", str(cpu_only)], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "reserves no GPU" in refused.stderr
