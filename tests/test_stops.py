"""Stop handling: stop strings across token boundaries, stop token ids, length, and min_tokens
deferring every stop.

Everything runs the `tiny` random-weight Mixtral in fp32 on CPU with small prompts.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from engine.sampling_params import SamplingParams
from engine_support import GREEDY, assert_idle, make_engine, rand_ids, run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------
# Stop handling


GreedyRun = tuple[list[int], list[int], list[str]]


@pytest.fixture(scope="module")
def greedy_reference(tiny_checkpoint: Path) -> GreedyRun:
    """(prompt, greedy tokens, per-token text deltas) of one 24-token greedy run."""
    prompt = rand_ids(random.Random(9), 12)
    res = run(make_engine(tiny_checkpoint), {"g": (prompt, SamplingParams(**GREEDY, max_tokens=24, ignore_eos=True))})
    choice = res["g"].choices[0]
    assert len(choice.deltas) == 24 and "".join(choice.deltas) == choice.text
    return prompt, choice.token_ids, choice.deltas


def _spanning_stop(deltas: list[str]) -> tuple[int, str]:
    """A 5-character stop string made of the end of token i and the start of token i + 1,
    whose first occurrence in the text is there."""
    text = "".join(deltas)
    offset = 0
    for i in range(len(deltas) - 8):  # leaves room for the min_tokens test to run past it
        offset += len(deltas[i])
        if i >= 2 and len(deltas[i]) >= 3 and len(deltas[i + 1]) >= 2:
            stop = deltas[i][-3:] + deltas[i + 1][:2]
            if text.find(stop) == offset - 3:
                return i, stop
    raise AssertionError(f"no token pair to build a spanning stop string from: {deltas}")


def test_stop_string_spanning_tokens(tiny_checkpoint: Path, greedy_reference: GreedyRun) -> None:
    prompt, tokens, deltas = greedy_reference
    i, stop = _spanning_stop(deltas)
    full = "".join(deltas)
    cut = full.find(stop)
    engine = make_engine(tiny_checkpoint)
    params = SamplingParams(**GREEDY, max_tokens=24, ignore_eos=True, stop=["no such text", stop])
    choice = run(engine, {"s": (prompt, params)})["s"].choices[0]
    assert choice.finish_reason == "stop" and choice.stop_reason == stop
    assert choice.token_ids == tokens[: i + 2]  # stopped on the token completing the string
    assert choice.text == full[:cut] and stop not in choice.text
    # The stream equals the final text, and no prefix of it ever ran past the cut.
    assert "".join(choice.deltas) == choice.text
    streamed = ""
    for piece in choice.deltas:
        streamed += piece
        assert choice.text.startswith(streamed)
    assert_idle(engine)


def test_stop_token_ids_and_length(tiny_checkpoint: Path, greedy_reference: GreedyRun) -> None:
    prompt, tokens, deltas = greedy_reference
    j = next(k for k in range(3, len(tokens)) if tokens[k] not in tokens[:k])
    engine = make_engine(tiny_checkpoint)
    res = run(engine, {
        "stop-id": (prompt, SamplingParams(**GREEDY, max_tokens=24, ignore_eos=True, stop_token_ids=[tokens[j]])),
        "length": (prompt, SamplingParams(**GREEDY, max_tokens=5, ignore_eos=True)),
    })
    stop_id = res["stop-id"].choices[0]
    assert stop_id.finish_reason == "stop" and stop_id.stop_reason == tokens[j]
    assert stop_id.token_ids == tokens[: j + 1]  # the stop token is returned, not its text
    assert stop_id.text == "".join(deltas[:j])
    length = res["length"].choices[0]
    assert length.finish_reason == "length" and length.stop_reason is None
    assert length.token_ids == tokens[:5] and length.text == "".join(deltas[:5])
    assert_idle(engine)


def test_min_tokens_defers_stops(tiny_checkpoint: Path, greedy_reference: GreedyRun) -> None:
    prompt, tokens, deltas = greedy_reference
    i, stop = _spanning_stop(deltas)
    j = next(k for k in range(3, len(tokens)) if tokens[k] not in tokens[:k])
    engine = make_engine(tiny_checkpoint)
    res = run(engine, {
        # The stop string completes at token i + 1, before min_tokens: it must not end the request.
        "string": (prompt, SamplingParams(**GREEDY, max_tokens=i + 6, min_tokens=i + 4, ignore_eos=True, stop=[stop])),
        # The stop token cannot even be sampled before min_tokens.
        "token": (prompt, SamplingParams(**GREEDY, max_tokens=j + 4, min_tokens=j + 2, ignore_eos=True,
                                         stop_token_ids=[tokens[j]])),
    })
    string = res["string"].choices[0]
    assert len(string.token_ids) >= i + 4
    assert string.token_ids == tokens[: len(string.token_ids)]
    token = res["token"].choices[0]
    assert len(token.token_ids) >= j + 2
    assert token.token_ids[:j] == tokens[:j] and token.token_ids[j] != tokens[j]
    assert tokens[j] not in token.token_ids[: j + 2]
    assert_idle(engine)


