"""Tool calls through the OpenAI API on a real Ray Serve: Mistral's format (v3 tokenizer, as
Mixtral-8x22B's) encoded by mistral_common, the model's [TOOL_CALLS] output as OpenAI's
`tool_calls`, streamed and not, `tool_choice` enforced by grammar; and the v1 format (8x7B),
which has no tool calls, where only a forced call works. Random weights: every valid call is the
grammar's work."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
import requests
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from deployments.tool_calls import ToolCallParser
from engine.checkpoint import PRESETS

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from deployments.app import build_app  # noqa: E402
from reliability_support import free_port  # noqa: E402

MODEL = "tiny"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "pattern": "^[A-Z][a-z]{1,7}$"},
                                  "unit": {"enum": ["c", "f"]}}}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "Local time",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["zone"],
                   "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}}}}}
TOOLS = [WEATHER, CLOCK]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "system", "content": "Use the tools."}, {"role": "user", "content": "Weather and time in Oslo?"}]


@dataclass
class Apps:
    base: str

    def client(self, app: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/{app}/v1", api_key="unused", max_retries=0, timeout=120)


def _args(model: Path) -> dict[str, Any]:
    return {"model": str(model), "served_model_name": MODEL, "default_tier": "latency",
            "tiers": {"latency": {"engine": {"dtype": "float32", "max_model_len": 1024,
                                             "cache": {"kv_cache_bytes": "16MiB"}},
                                  "tuning": {"max_num_seqs": 8, "stream_flush_ms": 0},
                                  "deployment": {"num_cpus": 0.1}}}}


@pytest.fixture(scope="module")
def apps(make_checkpoint: Any, tiny_checkpoint: Path) -> Iterator[Apps]:
    v3 = make_checkpoint(PRESETS["tiny"].model_copy(update={"vocab_size": 32768}))
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(_args(v3)), name="v3", route_prefix="/v3")
        serve.run(build_app(_args(tiny_checkpoint)), name="v1", route_prefix="/v1fmt")
        yield Apps(f"http://127.0.0.1:{port}")
    finally:
        serve.shutdown()
        ray.shutdown()


def _calls(message: Any) -> list[tuple[str, dict[str, Any]]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


def _assert_valid(calls: list[tuple[str, dict[str, Any]]], names: set[str]) -> None:
    assert calls
    for name, arguments in calls:
        assert name in names
        jsonschema.validate(arguments, SCHEMAS[name])


# ---- the parser, alone ---------------------------------------------------------------------------
@pytest.mark.parametrize("piece", [1, 2, 5, 1000])
def test_parser_finds_each_call_however_the_text_is_split(piece: int) -> None:
    text = ' [{"name": "a", "arguments": {"s": "x]}\\"{", "l": [1, {"b": 2}]}}, {"name": "b", "arguments": {}}]'
    parser = ToolCallParser()
    found = []
    for i in range(0, len(text), piece):
        found += parser.feed(text[i:i + piece])
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in found] == [
        ("a", {"s": 'x]}"{', "l": [1, {"b": 2}]}), ("b", {})]
    assert all(len(c["id"]) == 9 and c["id"].isalnum() for c in found) and parser.leftover() == ""
    assert ToolCallParser().feed("plain [text]") == []


# ---- v3: Mistral's tool format -------------------------------------------------------------------
def test_required_tool_calls_validate_streamed_and_not(apps: Apps) -> None:
    client = apps.client("v3")
    kwargs = {"model": MODEL, "messages": ASK, "tools": TOOLS, "tool_choice": "required", "seed": 5,
              "temperature": 1.0, "max_tokens": 200}
    whole = client.chat.completions.create(**kwargs)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = _calls(choice.message)
    _assert_valid(calls, set(SCHEMAS))
    with client.chat.completions.stream(**kwargs) as stream:  # the openai client's own accumulation
        streamed = stream.get_final_completion().choices[0]
    assert streamed.finish_reason == "tool_calls"
    assert _calls(streamed.message) == calls  # same seed: the same calls (ids are fresh per answer)
    assert len({c.id for c in choice.message.tool_calls}) == len(calls)


def test_named_function_without_parallel_calls(apps: Apps) -> None:
    answer = apps.client("v3").chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, max_tokens=120, temperature=1.0, parallel_tool_calls=False,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = _calls(answer.choices[0].message)
    assert len(calls) == 1 and calls[0][0] == "get_time"
    _assert_valid(calls, {"get_time"})


def test_call_and_result_round_trip_encode_as_mistral_common(apps: Apps) -> None:
    client = apps.client("v3")
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                           max_tokens=200, temperature=1.0, seed=2)
    message = first.choices[0].message
    turn = [*ASK, message.model_dump(exclude_none=True),
            *({"role": "tool", "tool_call_id": c.id, "content": "ok"} for c in message.tool_calls)]
    second = client.chat.completions.create(model=MODEL, messages=turn, tools=TOOLS, max_tokens=5)
    reference = MistralTokenizer.v3().encode_chat_completion(ChatCompletionRequest.from_openai(turn, tools=TOOLS))
    assert second.usage.prompt_tokens == len(reference.tokens)
    tokenized = requests.post(f"{apps.base}/v3/tokenize", json={"messages": turn, "tools": TOOLS}, timeout=30)
    assert tokenized.json()["tokens"] == reference.tokens


def test_auto_and_none(apps: Apps) -> None:
    client = apps.client("v3")
    auto = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=30, seed=1)
    assert auto.choices[0].finish_reason in {"stop", "length", "tool_calls"}
    for name, arguments in _calls(auto.choices[0].message):  # whatever it called, it parsed
        assert name and isinstance(arguments, dict)
    none = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=3)
    plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=3)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens  # "none": the prompt shows no tools
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
])
def test_bad_tool_requests_are_400s_naming_the_parameter(apps: Apps, body: dict[str, Any], param: str) -> None:
    raw = requests.post(f"{apps.base}/v3/v1/chat/completions", timeout=30,
                        json={"model": MODEL, "messages": ASK} | body)
    assert raw.status_code == 400, raw.text
    assert raw.json()["error"]["param"].startswith(param), raw.json()


# ---- v1: no tool format --------------------------------------------------------------------------
def test_v1_refuses_auto_and_constrains_a_forced_call(apps: Apps) -> None:
    client = apps.client("v1fmt")
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=5)
    assert err.value.body["param"] == "tool_choice" and "no tool calls" in err.value.body["message"]
    forced = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                            max_tokens=200, temperature=1.0, seed=3)
    assert forced.choices[0].finish_reason == "tool_calls"
    _assert_valid(_calls(forced.choices[0].message), set(SCHEMAS))
