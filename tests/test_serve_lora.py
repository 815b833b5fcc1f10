"""LoRA adapters through the OpenAI API on a real Ray Serve: adapters from the config and loaded at
runtime (vLLM's endpoints), selected by `model`, mixed in one replica's batches, checked against
the offline engine with the same adapter; errors, unloading while streams run, metrics per adapter."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from engine import LLM, LoRARequest, SamplingParams
from benchmarks.prefix_routing_bench import served_locally
from engine.lora_adapter import write_random_adapter

ray = pytest.importorskip("ray")


MODEL = "tiny"
ENGINE = {"dtype": "float32", "max_model_len": 1024, "cache": {"kv_cache_bytes": "16MiB", "block_size": 8}}
PROMPTS = ["Hello there", "The capital of France is", "Once upon a time in a land far away"]
MAX_TOKENS = 12


@dataclass
class Stack:
    base: str
    metrics: str
    adapters: dict[str, Path]  # name -> folder (the config's and spare ones for runtime loading)

    def client(self, tier: str = "latency") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/{tier}/v1", api_key="unused", max_retries=0, timeout=120)

    def post(self, path: str, body: dict[str, Any]) -> requests.Response:
        return requests.post(f"{self.base}{path}", json=body, timeout=120)


@pytest.fixture(scope="module")
def stack(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("adapters")
    adapters = {
        "support": write_random_adapter(tiny_checkpoint, root / "support", rank=8, seed=11),
        "sql": write_random_adapter(tiny_checkpoint, root / "sql", rank=4, targets=("q_proj", "v_proj", "w2"),
                                    layout="mistral", seed=12),
        "late": write_random_adapter(tiny_checkpoint, root / "late", rank=8, targets=("w1", "w3"), seed=13),
        "later": write_random_adapter(tiny_checkpoint, root / "later", rank=6, seed=14),
        "too-big": write_random_adapter(tiny_checkpoint, root / "too-big", rank=32, seed=15),
    }
    args = {
        "model": str(tiny_checkpoint), "served_model_name": MODEL, "default_tier": "latency",
        "tiers": {
            "latency": {"engine": ENGINE | {"lora": {"max_loras": 2, "max_lora_rank": 16}},
                        "tuning": {"max_num_seqs": 16, "stream_flush_ms": 0}, "deployment": {"num_cpus": 0.1},
                        "lora": {"adapters": {"support": str(adapters["support"]), "sql": str(adapters["sql"])},
                                 "runtime_loading": True}},
            "throughput": {"engine": ENGINE, "tuning": {"max_num_seqs": 8}, "deployment": {"num_cpus": 0.1}},
        },
    }
    with served_locally(args, "lora") as (base, metrics):
        yield Stack(base, metrics, adapters)


@pytest.fixture(scope="module")
def offline(tiny_checkpoint: Path, stack: Stack) -> dict[str | None, list[str]]:
    """Greedy text of each prompt per adapter (None: base), from the offline engine."""
    llm = LLM(tiny_checkpoint, **ENGINE, load_progress=False, lora={"max_loras": 1, "max_lora_rank": 16})
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    texts: dict[str | None, list[str]] = {None: [r.text for r in llm.generate(PROMPTS, greedy)]}
    for name in ("support", "sql", "late", "later"):
        lora = LoRARequest(name, str(stack.adapters[name]))
        texts[name] = [r.text for r in llm.generate(PROMPTS, greedy, lora_request=lora)]
    chat = [{"role": "user", "content": PROMPTS[1]}]
    texts["chat:support"] = [llm.chat(chat, greedy, lora_request=LoRARequest("support", str(stack.adapters["support"]))
                                      ).text]
    return texts


def complete(stack: Stack, model: str, prompt: str, stream: bool = False, tier: str = "latency") -> str:
    body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                            "extra_body": {"ignore_eos": True}}
    client = stack.client(tier)
    if not stream:
        return client.completions.create(**body).choices[0].text
    return "".join(chunk.choices[0].text for chunk in client.completions.create(**body, stream=True) if chunk.choices)


def test_models_lists_each_tiers_adapters_with_their_parent(stack: Stack) -> None:
    cards = {c.id: c for c in stack.client().models.list().data}
    assert set(cards) == {MODEL, "support", "sql"}
    assert cards["support"].parent == MODEL and cards["support"].root == str(stack.adapters["support"])  # type: ignore[attr-defined]
    assert [c.id for c in stack.client("throughput").models.list().data] == [MODEL]


def test_model_selects_the_adapter_on_every_endpoint(stack: Stack, offline: dict[str | None, list[str]]) -> None:
    for model, key in ((MODEL, None), ("support", "support"), ("sql", "sql")):
        for i, prompt in enumerate(PROMPTS):
            assert complete(stack, model, prompt, stream=i % 2 == 1) == offline[key][i], (model, prompt)
    chat = stack.client().chat.completions.create(
        model="support", messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"ignore_eos": True})
    assert chat.model == "support" and chat.choices[0].message.content == offline["chat:support"][0]
    tokens = stack.post("/latency/tokenize", {"model": "sql", "prompt": "Hello"}).json()["tokens"]
    assert tokens == stack.post("/latency/tokenize", {"model": MODEL, "prompt": "Hello"}).json()["tokens"]


def test_concurrent_requests_of_different_adapters_share_the_replica(stack: Stack,
                                                                     offline: dict[str | None, list[str]]) -> None:
    """Base, two config adapters and a runtime one at once, streamed and not, on one replica whose
    two adapter slots are fewer than the three adapters: every answer is the offline engine's."""
    assert stack.post("/latency/v1/load_lora_adapter",
                      {"lora_name": "late", "lora_path": str(stack.adapters["late"])}).status_code == 200
    try:
        jobs = [(model, key, i, stream) for model, key in ((MODEL, None), ("support", "support"), ("sql", "sql"),
                                                         ("late", "late"))
                for i in range(len(PROMPTS)) for stream in (False, True)]
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            futures = {pool.submit(complete, stack, model, PROMPTS[i], stream): (key, i)
                       for model, key, i, stream in jobs}
            for future, (key, i) in futures.items():
                assert future.result() == offline[key][i], (key, i)
    finally:
        assert stack.post("/latency/v1/unload_lora_adapter", {"lora_name": "late"}).status_code == 200


def test_unknown_adapters_and_bad_loads_are_clear_errors(stack: Stack) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        complete(stack, "nobody", "Hi")
    assert missing.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        complete(stack, "support", "Hi", tier="throughput")  # adapters are per tier
    bad = {
        ("later", str(stack.adapters["too-big"])): "rank 32, above max_lora_rank 16",
        ("later", "/nonexistent/folder"): "does not exist",
        ("support", str(stack.adapters["later"])): "already been loaded",
        ("bad name!", str(stack.adapters["later"])): "lora_name",
    }
    for (name, path), message in bad.items():
        response = stack.post("/latency/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        assert response.status_code == 400 and message in response.text, (name, response.text)
    off = stack.post("/throughput/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(stack.adapters["later"])})
    assert off.status_code == 400 and off.json()["error"]["code"] == "runtime_loading_disabled"
    gone = stack.post("/latency/v1/unload_lora_adapter", {"lora_name": "never-loaded"})
    assert gone.status_code == 404
    assert stack.post("/latency/v1/unload_lora_adapter", {"lora_name": "sql"}).status_code == 400  # from the config
    assert complete(stack, MODEL, "Hi")  # the tier serves on


def test_load_then_unload_while_other_requests_stream(stack: Stack, offline: dict[str | None, list[str]]) -> None:
    loaded = stack.post("/v1/load_lora_adapter", {"lora_name": "later", "lora_path": str(stack.adapters["later"])})
    assert loaded.status_code == 200 and "later" in loaded.text
    assert complete(stack, "later", PROMPTS[0]) == offline["later"][0]
    body = {"model": "later", "prompt": "A long story:", "max_tokens": 200, "temperature": 0,
            "extra_body": {"ignore_eos": True}}
    streams = [stack.client().completions.create(**body, stream=True) for _ in range(3)]
    firsts = [next(iter(s)) for s in streams]  # every stream has started
    assert all(f.choices for f in firsts)
    assert stack.post("/v1/unload_lora_adapter", {"lora_name": "later"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        complete(stack, "later", "Hi")
    for stream in streams:  # those running finish as they began
        chunks = list(stream)
        assert chunks[-1].choices[0].finish_reason == "length"
    assert "later" not in {c.id for c in stack.client().models.list().data}


def test_metrics_per_adapter(stack: Stack) -> None:
    for _ in range(2):
        complete(stack, "support", "Hi")
    deadline = time.monotonic() + 30
    text = ""
    while time.monotonic() < deadline:
        text = requests.get(stack.metrics, timeout=10).text
        if 'ray_mixtral_lora_requests_total{' in text and "ray_mixtral_lora_resident_adapters{" in text:
            break
        time.sleep(1)
    lines = [line for line in text.splitlines() if line.startswith("ray_mixtral_lora_")]
    requests_by_adapter = {line.split('adapter="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
                           for line in lines if line.startswith("ray_mixtral_lora_requests_total{")}
    assert requests_by_adapter.get("support", 0) >= 2, lines
    tokens = [line for line in lines if line.startswith("ray_mixtral_lora_generation_tokens_total{")
              and 'adapter="support"' in line]
    assert tokens and float(tokens[0].rsplit(" ", 1)[1]) >= 2 * MAX_TOKENS
    assert any(line.startswith("ray_mixtral_lora_adapter_reads_total{") for line in lines), lines
