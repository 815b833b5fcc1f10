"""The Serve application end to end: a real Ray Serve on 127.0.0.1, the real `openai` client.

One app for the whole module (configs/local.yaml with test ports and short autoscaling
delays), deployed declaratively through the dashboard's REST API like `serve deploy`, so
live `user_config` updates reach the running replicas without a restart.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import aiohttp
import jsonschema
import openai
import pytest
import requests
import yaml
from pydantic import BaseModel, Field

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402
from ray.dashboard.modules.serve.sdk import ServeSubmissionClient  # noqa: E402

from engine.host_cpus import physical_cores  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "local.yaml"
APP = "mixtral"
TIERS = ("latency", "throughput", "fixed-latency")
MODEL = "mixtral-tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_config(http_port: int) -> dict[str, Any]:
    """configs/local.yaml, with a free port and autoscaling fast enough for a test: only the
    latency tier reacts to load; the other two could scale but never reach their targets."""
    config = yaml.safe_load(CONFIG.read_text())
    config["http_options"]["port"] = http_port
    tiers = config["applications"][0]["args"]["tiers"]
    tiers["latency"]["autoscaling"].update(
        min_replicas=1, max_replicas=2, target_queue_depth=2, upscale_delay_s=1, downscale_delay_s=4,
        metrics_interval_s=0.5, look_back_period_s=2,
    )
    for name in ("throughput", "fixed-latency"):
        tiers[name]["autoscaling"].update(target_queue_depth=10_000, metrics_interval_s=0.5, look_back_period_s=2)
    # The fixed-latency test queues requests for seconds on purpose: no TTFT-driven upscale there.
    tiers["fixed-latency"]["tuning"].pop("ttft_target_ms")
    # That test takes its target from the throughput tier under load: both step on the same threads,
    # so the two differ in scheduling alone.
    tiers["throughput"]["engine"].pop("cpu_threads")
    return config


@dataclass
class App:
    base: str
    client: ServeSubmissionClient
    config: dict[str, Any]
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # tier -> user_config

    def openai(self, tier: str | None, **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url(tier), api_key="unused", max_retries=0, timeout=120, **kwargs)

    def async_openai(self, tier: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url(tier), api_key="unused", max_retries=0, timeout=300)

    def url(self, tier: str | None) -> str:
        return f"{self.base}/{tier}/v1" if tier else f"{self.base}/v1"

    def stats(self, tier: str) -> dict[str, Any]:
        return requests.get(f"{self.base}/{tier}/stats", timeout=30).json()

    def tuning(self, tier: str) -> dict[str, Any]:
        args = self.config["applications"][0]["args"]
        return dict(self.overrides.get(tier, args["tiers"][tier]["tuning"]))

    def retune(self, tier: str, **changes: Any) -> None:
        """Live tuning the way an operator does it: a `deployments:` override, redeployed."""
        self.overrides[tier] = {**self.tuning(tier), **changes}
        config = copy.deepcopy(self.config)
        config["applications"][0]["deployments"] = [
            {"name": name, "user_config": user_config} for name, user_config in self.overrides.items()
        ]
        self.client.deploy_applications(config)
        deadline = time.monotonic() + 60
        while any(self.stats(tier)["tuning"][k] != v for k, v in self.overrides[tier].items()):
            assert time.monotonic() < deadline, f"{tier} never picked up {self.overrides[tier]}"
            time.sleep(0.2)


def running_replicas() -> dict[str, int]:
    deployments = serve.status().applications[APP].deployments
    return {name: deployments[name].replica_states.get("RUNNING", 0) for name in TIERS}


@pytest.fixture(scope="module")
def app() -> Iterator[App]:
    dashboard, http = free_port(), free_port()
    # NOTE: the metrics export port must lie outside Ray's worker port range (10002-19999);
    # an OS-assigned ephemeral port always does.
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=dashboard, _metrics_export_port=free_port(), logging_level="ERROR")
    try:
        client = ServeSubmissionClient(f"http://127.0.0.1:{dashboard}")
        config = app_config(http)
        t0 = time.monotonic()
        client.deploy_applications(config)
        while (status := serve.status().applications.get(APP)) is None or status.status != "RUNNING":
            assert status is None or status.status != "DEPLOY_FAILED", status.message
            assert time.monotonic() - t0 < 180, "the app did not start in 3 minutes"
            time.sleep(0.5)
        print(f"\napp running {time.monotonic() - t0:.1f}s after deploy")
        yield App(f"http://127.0.0.1:{http}", client, config)
    finally:
        serve.shutdown()
        ray.shutdown()


# ---- API --------------------------------------------------------------------------------------
def test_health_and_models(app: App) -> None:
    health = requests.get(f"{app.base}/health", timeout=30)
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "tiers": {t: "ok" for t in TIERS}}
    assert health.headers["x-request-id"]
    for tier in (*TIERS, None):
        models = app.openai(tier).models.with_raw_response.list()
        assert [m.id for m in models.parse().data] == [MODEL]
        assert models.headers["x-tier"] == (tier or "latency")  # /v1 = the default tier


def test_replica_engines_compute_on_the_hosts_cores(app: App) -> None:
    """Every tier reserves 0.2 CPU, for which Ray sets OMP_NUM_THREADS=1 in the replica; its engine
    core still steps on every core (one thread halved the bench checkpoint's decode speed) unless its
    config names `cpu_threads` (local.yaml's latency tier: one)."""
    engines = {tier: app.config["applications"][0]["args"]["tiers"][tier]["engine"] for tier in TIERS}
    assert engines["latency"]["cpu_threads"] == 1 and engines["fixed-latency"].get("cpu_threads") is None
    expected = {tier: engine.get("cpu_threads") or physical_cores() for tier, engine in engines.items()}
    assert {tier: app.stats(tier)["cpu_threads"] for tier in TIERS} == expected


@pytest.mark.parametrize("tier", TIERS)
def test_tier_answers_completions_and_chat(app: App, tier: str) -> None:
    client = app.openai(tier)
    kwargs = dict(model=MODEL, max_tokens=12, temperature=0.8, seed=7)
    raw = client.completions.with_raw_response.create(prompt="The capital of France is", **kwargs)
    assert raw.headers["x-tier"] == tier
    assert raw.headers["x-request-id"]
    assert float(raw.headers["x-queue-ms"]) >= 0
    whole = raw.parse()
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 12 and whole.usage.total_tokens == whole.usage.prompt_tokens + 12

    chunks = list(client.completions.create(prompt="The capital of France is", stream=True,
                                            stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    chat = client.chat.completions.with_raw_response.create(messages=messages, **kwargs)
    assert chat.headers["x-tier"] == tier
    reply = chat.parse().choices[0]
    assert reply.message.role == "assistant" and reply.finish_reason == "length"
    streamed = list(client.chat.completions.create(messages=messages, stream=True, **kwargs))
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == reply.message.content


def test_sampling_features(app: App) -> None:
    client = app.openai(None)
    vllm_extras = {"top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1, "min_tokens": 6, "ignore_eos": True}
    out = client.completions.create(model=MODEL, prompt=["Once upon a time", "Far away"], n=2, max_tokens=6,
                                    temperature=1.0, seed=3, logprobs=2, extra_body=vllm_extras)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]  # prompt-major: prompt * n + choice
    assert out.usage.completion_tokens == 4 * 6
    for choice in out.choices:
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
        assert all(len(top) <= 2 for top in lp.top_logprobs)
    ids = client.completions.create(model=MODEL, prompt=[1, 415, 5565], max_tokens=4,
                             extra_body={"stop_token_ids": [2]})
    assert ids.usage.prompt_tokens == 3

    greedy = dict(model=MODEL, prompt="Tell me a story", max_tokens=24, temperature=0)
    text = client.completions.create(**greedy).choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = client.completions.create(stop=[stop], **greedy).choices[0]
    assert cut.finish_reason == "stop" and cut.text == text[: text.index(stop)]

    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=5, logprobs=True, top_logprobs=3, temperature=0)
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(len(t.top_logprobs) == 3 for t in content)
    assert content[0].top_logprobs[0].logprob == pytest.approx(content[0].logprob)  # greedy: the top one


def test_sse_ends_with_done(app: App) -> None:
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "stream": True}
    with requests.post(f"{app.base}/throughput/v1/completions", json=body, stream=True, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines(decode_unicode=True) if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)


def test_errors_use_the_openai_envelope(app: App) -> None:
    client = app.openai("latency")
    with pytest.raises(openai.BadRequestError) as err:  # the engine's RequestError, with its param
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=100_000)
    assert err.value.body["param"] == "max_tokens" and "maximum context length" in err.value.body["message"]
    assert err.value.response.headers["x-request-id"]
    with pytest.raises(openai.BadRequestError) as err:  # request validation
        client.completions.create(model=MODEL, prompt="Hi", temperature=9)
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as err:  # the chat template
        client.chat.completions.create(model=MODEL, messages=[{"role": "assistant", "content": "x"}])
    assert err.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as err:  # known but unsupported
        client.completions.create(model=MODEL, prompt="Hi", echo=True)
    assert err.value.body["param"] == "echo"
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4", prompt="Hi")
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError) as err:
        app.openai("no-such-tier").completions.create(model=MODEL, prompt="Hi")
    assert err.value.body["code"] == "tier_not_found"
    raw = requests.post(f"{app.base}/latency/v1/completions", json={"prompt": "Hi", "n": 0}, timeout=30)
    assert raw.status_code == 400
    assert set(raw.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("tier", [*TIERS, None])
def test_tokenize_and_detokenize_match_what_generation_sees(app: App, tier: str | None) -> None:
    root = f"{app.base}/{tier}" if tier else app.base
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    chat = requests.post(f"{root}/tokenize", json={"model": MODEL, "messages": messages}, timeout=30)
    assert chat.status_code == 200, chat.text
    body = chat.json()
    answer = app.openai(tier).chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert body["count"] == len(body["tokens"]) == answer.usage.prompt_tokens
    assert body["max_model_len"] == 2048 and body["token_strs"] is None
    prompt = requests.post(f"{root}/tokenize", json={"prompt": "Hello there", "return_token_strs": True},
                           timeout=30).json()
    assert prompt["tokens"][0] == 1 and "".join(prompt["token_strs"][1:]).strip() == "Hello there"
    bare = requests.post(f"{root}/tokenize", json={"prompt": "Hello there", "add_special_tokens": False},
                         timeout=30).json()
    assert bare["tokens"] == prompt["tokens"][1:]
    back = requests.post(f"{root}/detokenize", json={"model": MODEL, "tokens": prompt["tokens"]}, timeout=30)
    assert back.json() == {"prompt": "Hello there"}
    for path, payload, param in (("tokenize", {"prompt": "x", "messages": messages}, "prompt"),
                                 ("tokenize", {"messages": [{"role": "assistant", "content": "x"}]}, "messages"),
                                 ("detokenize", {"tokens": [5, 10**9]}, "tokens")):
        bad = requests.post(f"{root}/{path}", json=payload, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param, bad.text


# ---- structured outputs -----------------------------------------------------------------------
class Pet(BaseModel):
    """Bounded fields: random weights would otherwise write one string until max_tokens."""

    name: Annotated[str, Field(pattern=r"^[a-z]{1,8}$")]
    legs: Annotated[int, Field(ge=0, le=8)]
    kind: Literal["cat", "dog"]
    toys: Annotated[list[Literal["ball", "bone"]], Field(min_length=1, max_length=2)]


@pytest.mark.parametrize("tier", TIERS)
def test_openai_parse_returns_the_pydantic_object_on_every_tier(app: App, tier: str) -> None:
    completion = app.openai(tier).chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "A pet, please."}], response_format=Pet,
        temperature=1.0, max_tokens=120)
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop", message.content
    assert isinstance(message.parsed, Pet) and Pet.model_validate_json(message.content) == message.parsed


def test_json_schema_streamed_and_not_with_n_and_seed(app: App) -> None:
    schema = Pet.model_json_schema() | {"additionalProperties": False}  # else any extra key may follow
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": schema, "strict": True}}
    client = app.openai("throughput")
    kwargs = {"model": MODEL, "messages": [{"role": "user", "content": "Pet?"}], "response_format": fmt,
              "max_tokens": 120, "temperature": 1.0, "seed": 11, "n": 2}
    whole = client.chat.completions.create(**kwargs)
    texts = ["", ""]
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [c.message.content for c in whole.choices]  # seeded: the same, streamed or not
    assert [c.finish_reason for c in whole.choices] == ["stop", "stop"]
    for text in texts:
        jsonschema.validate(json.loads(text), schema)


def test_vllm_structured_output_extras_on_completions(app: App) -> None:
    client = app.openai("latency")
    choice = client.completions.create(model=MODEL, prompt="Pick:", max_tokens=10,
                                       extra_body={"guided_choice": ["left", "right"]})
    assert choice.choices[0].text in {"left", "right"}
    regex = client.completions.create(model=MODEL, prompt="Code:", max_tokens=20,
                                      extra_body={"structured_outputs": {"regex": "[A-F]{4}"}})
    assert re.fullmatch("[A-F]{4}", regex.choices[0].text)
    obj = client.completions.create(model=MODEL, prompt="JSON:", max_tokens=40,
                                    extra_body={"guided_json": json.dumps({"type": "integer", "minimum": 0, "maximum": 99})})
    assert 0 <= int(obj.choices[0].text) <= 99


@pytest.mark.parametrize(("body", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format"),
    ({"guided_regex": "a(b"}, "guided_regex"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_choice": ["a"], "response_format": {"type": "json_object"}}, "guided_choice"),
    ({"response_format": {"type": "xml"}}, "response_format"),
])
def test_bad_output_constraints_are_400s_naming_the_parameter(app: App, body: dict[str, Any], param: str) -> None:
    raw = requests.post(f"{app.base}/latency/v1/chat/completions", timeout=30,
                        json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]} | body)
    assert raw.status_code == 400, raw.text
    assert raw.json()["error"]["param"].startswith(param), raw.json()


# ---- live tuning ------------------------------------------------------------------------------
def test_reconfigure_without_restart(app: App) -> None:
    before = app.stats("latency")
    app.retune("latency", max_num_seqs=1, max_num_batched_tokens=64)
    after = app.stats("latency")
    assert after["replica_id"] == before["replica_id"]  # the same replica, reconfigured in place

    async def run() -> list[float]:
        async with app.async_openai("latency") as client:
            calls = [client.completions.with_raw_response.create(
                model=MODEL, prompt=f"Request {i}", max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
                for i in range(3)]
            return [float(r.headers["x-queue-ms"]) for r in await asyncio.gather(*calls)]

    queue_ms = sorted(asyncio.run(run()))
    # One sequence at a time: the last of three waits for two whole generations.
    assert queue_ms[-1] > 2 * max(queue_ms[0], 1.0), queue_ms
    assert app.stats("latency")["tuning"]["max_num_seqs"] == 1
    app.retune("latency", max_num_seqs=4, max_num_batched_tokens=256)
    assert app.stats("latency")["replica_id"] == before["replica_id"]


def test_streamed_chunks_cost_a_frame_per_step_not_per_stream(app: App) -> None:
    """Keeps the serving path's per-token work from coming back, without timing: sixteen streams whose
    every step is sent at once (no flush interval) reach the router in one channel frame per replica
    step, whatever the number of streams (not a Ray message per stream and token)."""
    streams, tokens = 16, 24
    original = app.tuning("throughput")
    app.retune("throughput", stream_flush_ms=0, stream_max_messages_per_s=None)
    try:
        before = app.stats("throughput")

        async def run() -> list[int]:
            async with app.async_openai("throughput") as client:
                async def one(i: int) -> int:
                    stream = await client.completions.create(model=MODEL, prompt=f"Stream {i}", max_tokens=tokens,
                                                             stream=True, extra_body={"ignore_eos": True})
                    return len([chunk async for chunk in stream])

                return await asyncio.gather(*(one(i) for i in range(streams)))

        chunks = asyncio.run(run())
        after = app.stats("throughput")
    finally:
        app.retune("throughput", **original)
    frames = after["stream_frames_sent"] - before["stream_frames_sent"]
    steps = after["steps_total"] - before["steps_total"]
    assert after["replica_id"] == before["replica_id"]
    assert sum(chunks) >= streams * tokens // 2, chunks  # most steps streamed on their own
    assert 1 <= frames <= steps + streams, (frames, steps)
    assert sum(chunks) >= 4 * frames, (sum(chunks), frames)  # a frame carries many streams' chunks


# ---- autoscaling ------------------------------------------------------------------------------
def test_autoscaling_follows_queue_depth(app: App) -> None:
    trace: list[tuple[float, dict[str, int]]] = []
    stop_load, stop_trace = threading.Event(), threading.Event()
    t0 = time.monotonic()

    def record() -> None:
        while not stop_trace.is_set():
            trace.append((round(time.monotonic() - t0, 1), running_replicas()))
            time.sleep(0.5)

    async def load() -> None:
        async with app.async_openai("latency") as client:

            async def worker(i: int) -> None:
                while not stop_load.is_set():
                    await client.completions.create(model=MODEL, prompt=f"Load {i}", max_tokens=48,
                                                    extra_body={"ignore_eos": True})

            await asyncio.gather(*(worker(i) for i in range(8)))

    recorder = threading.Thread(target=record, daemon=True)
    recorder.start()
    loader = threading.Thread(target=asyncio.run, args=(load(),), daemon=True)
    loader.start()
    try:
        deadline = time.monotonic() + 90
        while not (trace and trace[-1][1]["latency"] >= 2):
            assert time.monotonic() < deadline, f"no upscale under load: {trace}"
            time.sleep(0.5)
        scaled_up_at = trace[-1][0]
        time.sleep(2)  # the second replica takes part in the load for a moment
    finally:
        stop_load.set()
        loader.join(timeout=120)
    deadline = time.monotonic() + 90
    while trace[-1][1]["latency"] != 1:
        assert time.monotonic() < deadline, f"no downscale after the load: {trace}"
        time.sleep(0.5)
    stop_trace.set()
    recorder.join()
    changes = [trace[0]] + [p for a, p in zip(trace, trace[1:]) if p[1] != a[1]]
    print(f"\nreplica-count trace (s since load start -> RUNNING replicas): {changes}; "
          f"2 latency replicas at {scaled_up_at}s, back to 1 at {trace[-1][0]}s")
    assert all(r["throughput"] == 1 and r["fixed-latency"] == 1 for _, r in trace)  # other tiers untouched


# ---- fixed latency ----------------------------------------------------------------------------
@dataclass
class StreamTimes:
    itl: list[float] = field(default_factory=list)  # seconds per token between streamed chunks
    ttft: list[float] = field(default_factory=list)
    tokens_per_s: float = 0.0

    def summary(self) -> dict[str, float]:
        return {"p50_itl_ms": round(statistics.median(self.itl) * 1000, 2), "p90_itl_ms": round(p90(self.itl) * 1000, 2),
                "p50_ttft_ms": round(statistics.median(self.ttft) * 1000, 1), "tokens_per_s": round(self.tokens_per_s)}


async def stream_load(app: App, tier: str, streams: int, max_tokens: int, long_every: int = 0) -> StreamTimes:
    """`streams` concurrent greedy streams; per token, the gap between streamed chunks divided
    by the tokens in the later chunk (throughput tiers send several tokens per chunk). With
    `long_every` k, every k-th stream brings a ~700-token prompt, prefilled in chunks between the
    others' decode steps.

    NOTE: a bare SSE reader rather than the openai client: at tens of streams the client's own
    parsing costs as much CPU as a serving process, and on two cores that would be measured too.
    """
    times = StreamTimes()

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        prompt = f"Stream {i} tells a story" + (" of the long history of the world" * 100
                                                  if long_every and i % long_every == 0 else "")
        body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0, "stream": True, "logprobs": 0, "ignore_eos": True}
        start = last = time.perf_counter()
        async with session.post(f"{app.url(tier)}/completions", json=body) as response:
            assert response.status == 200, await response.text()
            async for line in response.content:
                if not line.startswith(b"data: {"):
                    continue
                now = time.perf_counter()
                choices = json.loads(line[6:])["choices"]
                tokens = len(choices[0]["logprobs"]["tokens"]) if choices else 0
                if tokens and last == start:
                    times.ttft.append(now - start)
                elif tokens:
                    times.itl.extend([(now - last) / tokens] * tokens)
                if tokens:
                    last = now

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(one(session, i) for i in range(streams)))
        times.tokens_per_s = streams * max_tokens / (time.perf_counter() - start)
    return times


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1]


def test_fixed_latency_tier_holds_its_itl_target(app: App) -> None:
    streams, max_tokens = 48, 32
    single = asyncio.run(stream_load(app, "fixed-latency", 1, 48))
    single_itl = statistics.median(single.itl)
    loaded = asyncio.run(stream_load(app, "throughput", streams, max_tokens))
    # A target a few single-stream steps long, which the loaded throughput tier breaks.
    # NOTE: not much higher: on two shared cores the router, proxy and client carry only a few
    # hundred streamed chunks a second, and the engine cannot see that path's queue. And never
    # above what the loaded throughput tier shows: how fast the engines run on this host's cores
    # sets both figures, and the test needs a target that load breaks.
    target = min(5 * single_itl, 0.9 * p90(loaded.itl))
    assert target > 2 * single_itl, "the load is too light to test against on this machine"

    replica = app.stats("fixed-latency")["replica_id"]
    # A third of the target is left to the serving path: on these two cores it widens the tail
    # of streamed gaps by 15-35% over the engine's own step periods.
    app.retune("fixed-latency", itl_target_ms=round(target * 1000, 2),
               itl_serving_margin_ms=round(target * 1000 / 3, 2))
    asyncio.run(stream_load(app, "fixed-latency", streams // 2, max_tokens))  # the controller learns the load
    held = asyncio.run(stream_load(app, "fixed-latency", streams, max_tokens))
    # Long prompts among the short ones: their prefill chunks share steps with the decodes, and
    # the controller must size them so the decodes' gaps still hold.
    mixed = asyncio.run(stream_load(app, "fixed-latency", streams, max_tokens, long_every=4))
    stats = app.stats("fixed-latency")
    report = {
        "single_stream_itl_ms": round(single_itl * 1000, 2),
        "target_ms": round(target * 1000, 2),
        "throughput_tier": loaded.summary(),
        "fixed_latency_tier": held.summary(),
        "fixed_latency_tier_mixed_prompts": mixed.summary(),
        "latency_fit": stats["latency_fit"],
    }
    print("\nfixed-latency vs throughput under the same load:", json.dumps(report))
    assert stats["replica_id"] == replica
    assert p90(held.itl) <= target, report
    assert p90(mixed.itl) <= target, report
