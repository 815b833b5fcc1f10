"""Grammar-constrained decoding in the engine: random weights write gibberish, so every valid
output below is the grammar's work. The sampler's mask against a plain reference, a grid of
JSON schemas, regexes, choices and a Lark grammar, constrained and free requests in one batch,
n > 1, logprobs, seeds, stop strings, and compilation that never holds up other requests."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from engine import LLM, SamplingParams
from engine.sampling import Sampler, SamplingRow, allowed_tokens
from engine.structured_output import StructuredOutput

SCHEMAS: dict[str, dict[str, Any]] = {
    "nested": {
        "type": "object",
        "properties": {
            "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                                     "name": {"type": "string", "maxLength": 6}},
                     "required": ["id", "name"], "additionalProperties": False},
            "active": {"type": "boolean"},
        },
        "required": ["user", "active"], "additionalProperties": False,
    },
    "array_bounds": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                "minItems": 2, "maxItems": 4}},
        "required": ["tags"], "additionalProperties": False,
    },
    "bounded_numbers": {
        "type": "object",
        "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1},
                       "count": {"type": "integer", "minimum": -5, "maximum": 5}},
        "required": ["score", "count"], "additionalProperties": False,
    },
    "pattern": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                       "kind": {"enum": ["a", "b", 3, None]}},
        "required": ["code", "kind"], "additionalProperties": False,
    },
    "top_level_array": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                        "minItems": 1, "maxItems": 3},
}


@pytest.fixture(scope="module")
def llm(tiny_checkpoint: Path) -> LLM:
    return LLM(tiny_checkpoint, cache={"kv_cache_bytes": "32MiB"})  # not a quarter of the host's memory


def _params(spec: StructuredOutput | None, seed: int, **kw: Any) -> SamplingParams:
    return SamplingParams(**{"temperature": 1.0, "max_tokens": 160, "seed": seed, "structured_output": spec} | kw)


# ---- the sampler's mask ------------------------------------------------------------------------
@pytest.mark.parametrize(("rows", "vocab"), [(1, 31), (3, 64), (5, 1000), (4, 32000)])
def test_mask_unpacks_to_the_allowed_set(rows: int, vocab: int) -> None:
    gen = torch.Generator().manual_seed(rows * vocab)
    allowed = torch.rand(rows, vocab, generator=gen) < 0.05  # [R, V] reference
    allowed[:, 0] = True
    words = (vocab + 31) // 32
    masks = torch.zeros(rows, words * 32, dtype=torch.int64)
    masks[:, :vocab] = allowed.long()
    packed = (masks.view(rows, words, 32) << torch.arange(32)).sum(-1)  # [R, W] as uint32 values
    packed = packed.to(torch.int64).where(packed < 2**31, packed - 2**32).to(torch.int32)
    assert torch.equal(allowed_tokens(packed, vocab), allowed)


def test_sampler_draws_only_allowed_tokens_and_leaves_free_rows_alone() -> None:
    vocab = 200
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, vocab, generator=gen)
    allowed_ids = [[5, 17, 199], [42]]
    masks = torch.zeros(2, (vocab + 31) // 32, dtype=torch.int32)
    for row, ids in enumerate(allowed_ids):
        for t in ids:
            masks[row, t // 32] |= torch.tensor(1 << (t % 32), dtype=torch.int64).to(torch.int32)
    greedy, sampled = SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)
    rows = [SamplingRow(sampled, [1], [], torch.Generator().manual_seed(1), 2, masks[0]),
            SamplingRow(greedy, [1], [], None, 2, masks[1]),
            SamplingRow(greedy, [1], [], None, 2),
            SamplingRow(sampled, [1], [], torch.Generator().manual_seed(2), 2)]
    for _ in range(20):
        out = Sampler()(logits, rows).token_ids
        assert out[0] in allowed_ids[0] and out[1] == 42
        assert out[2] == int(logits[2].argmax())


# ---- the engine ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_json_output_validates_against_its_schema(llm: LLM, name: str) -> None:
    schema = SCHEMAS[name]
    spec = StructuredOutput(json_schema=schema)
    results = llm.generate(["Describe it as JSON:"] * 4, [_params(spec, seed) for seed in range(4)])
    for result in results:
        assert result.finish_reason == "stop", result.text
        jsonschema.validate(json.loads(result.text), schema)


@pytest.mark.parametrize(("spec", "check"), [
    (StructuredOutput(regex=r"[0-9]{3}-[a-z]{2,4}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
    (StructuredOutput(choice=["yes", "no", "a (b)"]), lambda t: t in {"yes", "no", "a (b)"}),
    (StructuredOutput(grammar='start: "(" num ("+" num)* ")"\nnum: /[1-9]/'),
     lambda t: re.fullmatch(r"\([1-9](\+[1-9])*\)", t)),
    (StructuredOutput(json_object=True), lambda t: t.startswith("{")),
], ids=["regex", "choice", "lark", "json_object"])
def test_regex_choice_grammar_and_json_object(llm: LLM, spec: StructuredOutput, check: Any) -> None:
    results = llm.generate(["Answer:"] * 3, [_params(spec, seed, max_tokens=64) for seed in range(3)])
    for result in results:
        assert check(result.text), result.text
        if spec.json_object:
            assert result.text.startswith("{")  # an object begins, even if 64 tokens do not close it
        else:
            assert result.finish_reason == "stop"


def test_constrained_and_free_requests_share_steps_with_n_logprobs_seed_and_stop(llm: LLM) -> None:
    schema = SCHEMAS["array_bounds"]
    spec = StructuredOutput(json_schema=schema)
    constrained = _params(spec, 7, n=3, logprobs=2)
    free = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    stopped = _params(StructuredOutput(regex=r"[a-c]{1,30}"), 3, stop=["c"])
    first = llm.generate(["A", "B", "C"], [constrained, free, stopped])
    again = llm.generate(["A"], [constrained])[0]
    assert [o.text for o in again.outputs] == [o.text for o in first[0].outputs]  # seeded: reproducible
    for choice in first[0].outputs:
        jsonschema.validate(json.loads(choice.text), schema)
        assert len(choice.logprobs) == len(choice.token_ids)
        assert all(lp.logprob > -1e4 and len(lp.top) == 2 for lp in choice.logprobs)  # the chosen token is allowed
    assert len(first[1].outputs[0].token_ids) == 24  # the free request ran its course alongside
    assert "c" not in first[2].text and set(first[2].text) <= {"a", "b"}


def test_grammar_compilation_never_holds_up_other_requests(llm: LLM) -> None:
    """A grammar still compiling (its workers held busy here, as by a huge schema) leaves its
    request waiting while every other request steps; it starts when its grammar is ready."""
    engine = llm.engine
    release = threading.Event()
    busy = [engine.grammars._pool.submit(release.wait) for _ in range(2)]  # both compile workers
    spec = StructuredOutput(json_schema={"type": "object", "properties": {"x": {"const": "held"}},
                                         "required": ["x"], "additionalProperties": False})
    try:
        engine.add_request("held", [1, 5, 6], _params(spec, 0))
        engine.add_request("free", [1, 7, 8], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
        seen: dict[str, list[str]] = {"held": [], "free": []}
        for _ in range(5):
            for out in engine.step():
                seen[out.request_id] += [c.text for c in out.choices]
        assert len(seen["free"]) == 5 and not seen["held"]
        assert engine.has_unfinished  # the held request is still there, waiting for its grammar
    finally:
        release.set()
        for future in busy:
            future.result(timeout=30)
    while engine.has_unfinished:
        for out in engine.step():
            seen[out.request_id] += [c.text for c in out.choices]
    assert json.loads("".join(seen["held"])) == {"x": "held"}
    assert engine.blocks.num_used_blocks == 0 or engine.config.cache.enable_prefix_caching


def test_aborting_a_request_whose_grammar_is_compiling_frees_everything(llm: LLM) -> None:
    engine = llm.engine
    release = threading.Event()
    busy = [engine.grammars._pool.submit(release.wait) for _ in range(2)]
    try:
        engine.add_request("gone", [1, 5], _params(StructuredOutput(regex="[a-z]{40}"), 0))
        final = engine.abort_request("gone")
        assert final is not None and final.finished
        assert not engine.has_unfinished
    finally:
        release.set()
        for future in busy:
            future.result(timeout=30)
    assert engine.step() == []


def test_bench_structured_reports_both_modes(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "structured.json"
    done = subprocess.run([sys.executable, "-m", "mixtral_serve.cli", "bench", "structured", "--model",
                           str(tiny_checkpoint), "--streams", "2", "--output-len", "8", "--requests-per-stream", "1",
                           "--rounds", "1", "--kv-cache-bytes", "32MiB", "--json-out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {row["mode"]: row for row in json.loads(out.read_text())}
    assert set(rows) == {"none", "json_schema"} and all(row["tok_s"] > 0 for row in rows.values())
    assert rows["none"]["mean_output_tokens"] == 8  # ignore_eos: free requests run to max_tokens
    assert "x none" in done.stdout
