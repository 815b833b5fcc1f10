"""Tests for engine.tokenizer against mistral_common's reference encodings."""

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import mistral_common
import pytest
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from engine.tokenizer import ChatMessage, ChatTemplateError, Tokenizer

DATA = Path(mistral_common.__file__).parent / "data"
FILES = {"v1": DATA / "tokenizer.model.v1", "v3": DATA / "mistral_instruct_tokenizer_240323.model.v3"}
VERSIONS = ["v1", "v3"]

_REFERENCE_CLASSES = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}

CONVERSATIONS = {
    "single": [("user", "Hello world")],
    "system": [("system", "You are terse."), ("user", "Name a colour.")],
    "multi_turn": [
        ("user", "What is 2+2?"),
        ("assistant", "4"),
        ("user", "And times 3?"),
        ("assistant", "12, since 4 × 3 = 12."),
        ("user", "Thanks!"),
    ],
    "multi_turn_system": [
        ("system", "Answer in French.\nBe brief."),
        ("user", "Hi"),
        ("assistant", "Bonjour !  "),
        ("user", "How are you?"),
    ],
    "unicode": [
        ("system", "Réponds poliment 🙂"),
        ("user", "日本語で答えて: 𝔘nicode 🦙?"),
        ("assistant", "はい、わかりました。 🦙"),
        ("user", "  leading and trailing spaces  \n\nand newlines\t"),
    ],
    "empty_user": [("user", "")],
    "empty_system": [("system", ""), ("user", "hi")],
}

STREAM_TEXTS = [
    "Héllo wörld, ça va? Ñandú",
    "Emoji 🦙🦙 and 😀 plus 𝔘 (byte fallback)",
    "中文和日本語のテキスト，한국어도",
    "line one\nline two\n\n\ttabbed   multiple    spaces  ",
    " leading space then \U0001f9ea\u200d mixed é😀中 end",
]


@pytest.fixture(scope="module")
def ours() -> dict[str, Tokenizer]:
    return {v: Tokenizer(FILES[v]) for v in VERSIONS}


@pytest.fixture(scope="module")
def reference() -> dict[tuple[str, ValidationMode], MistralTokenizer]:
    # v1()/v3() use test (serving) mode; finetuning mode encodes a final assistant turn.
    refs = {(v, ValidationMode.test): getattr(MistralTokenizer, v)() for v in VERSIONS}
    for v in VERSIONS:
        refs[(v, ValidationMode.finetuning)] = MistralTokenizer.from_file(FILES[v], mode=ValidationMode.finetuning)
    return refs


def reference_ids(tokenizer: MistralTokenizer, turns: list[tuple[str, str]]) -> list[int]:
    messages = [_REFERENCE_CLASSES[role](content=content) for role, content in turns]
    return tokenizer.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens


def as_dicts(turns: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in turns]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_chat_matches_mistral_common(ours, reference, version: str, name: str) -> None:
    turns = CONVERSATIONS[name]
    expected = reference_ids(reference[(version, ValidationMode.test)], turns)
    assert ours[version].apply_chat_template(as_dicts(turns)) == expected
    # ChatMessage objects and dicts are interchangeable; no final assistant means the
    # generation prompt flag changes nothing for the Mistral format.
    objects = [ChatMessage(role=role, content=content) for role, content in turns]
    assert ours[version].apply_chat_template(objects, add_generation_prompt=False) == expected


def test_v1_single_turn_known_ids(ours) -> None:
    ids = ours["v1"].apply_chat_template([{"role": "user", "content": "Hello world"}])
    assert ids == [1, 733, 16289, 28793, 22557, 1526, 733, 28748, 16289, 28793]


def test_inst_markers_are_control_ids_only_in_v3(ours) -> None:
    turns = as_dicts(CONVERSATIONS["multi_turn"])
    v3 = ours["v3"].apply_chat_template(turns)
    assert v3.count(3) == 3 and v3.count(4) == 3  # [INST] / [/INST]
    v1 = ours["v1"].apply_chat_template(turns)
    assert 3 not in v1 and 4 not in v1
    assert ours["v1"].decode(v1).count("[INST]") == 3


def test_system_prompt_placement(ours) -> None:
    turns = as_dicts(CONVERSATIONS["multi_turn_system"])
    for version, in_last_turn in (("v1", False), ("v3", True)):
        tokenizer = ours[version]
        ids = tokenizer.apply_chat_template(turns)
        last_turn = ids[len(ids) - 1 - ids[::-1].index(tokenizer.eos_id) :]
        assert ("Answer in French" in tokenizer.decode(last_turn)) is in_last_turn


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", ["multi_turn", "unicode"])
def test_full_conversation_matches_finetuning_encoding(ours, reference, version: str, name: str) -> None:
    turns = CONVERSATIONS[name] + [("assistant", "Final answer.")]
    expected = reference_ids(reference[(version, ValidationMode.finetuning)], turns)
    ids = ours[version].apply_chat_template(as_dicts(turns), add_generation_prompt=False)
    assert ids == expected
    assert ids[-1] == ours[version].eos_id


@pytest.mark.parametrize(
    ("messages", "add_generation_prompt", "problem"),
    [
        ([], True, "empty"),
        ([{"role": "robot", "content": "x"}], True, "unknown role"),
        ([{"role": "user", "content": "a"}, {"role": "tool", "content": "x"}], True, "tool_call_id"),
        ([{"role": "user"}], True, "content"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], True, "alternate"),
        ([{"role": "assistant", "content": "a"}], False, "alternate"),
        ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], False, "alternate"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], True, "system"),
        ([{"role": "system", "content": "s"}], True, "no user"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], True, "last message"),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}, {"role": "user", "content": "c"}],
            True,
            "empty content",
        ),
    ],
)
def test_bad_conversations_raise(ours, messages: list[dict], add_generation_prompt: bool, problem: str) -> None:
    with pytest.raises(ChatTemplateError, match=problem):
        ours["v3"].apply_chat_template(messages, add_generation_prompt=add_generation_prompt)


def test_chat_template_error_is_value_error() -> None:
    assert issubclass(ChatTemplateError, ValueError)


def test_llama2_sys_template_string() -> None:
    turns = as_dicts(CONVERSATIONS["multi_turn_system"])
    v1 = Tokenizer(FILES["v1"], chat_template="llama2-sys")
    ids = v1.apply_chat_template(turns)
    assert ids[0] == v1.bos_id and ids.count(v1.bos_id) == 1 and ids.count(v1.eos_id) == 1
    assert v1.decode(ids) == (
        "[INST] <<SYS>>\nAnswer in French.\nBe brief.\n<</SYS>>\n\nHi [/INST] Bonjour !   [INST] How are you? [/INST]"
    )
    # v3 files keep the same text between control [INST]/[/INST] ids.
    v3 = Tokenizer(FILES["v3"], chat_template="llama2-sys")
    ids = v3.apply_chat_template(turns)
    assert ids[:2] == [v3.bos_id, 3] and ids[-1] == 4
    assert v3.decode(ids) == "<<SYS>>\nAnswer in French.\nBe brief.\n<</SYS>>\n\nHi Bonjour ! How are you?"


def test_llama2_sys_without_system_equals_mistral_v1(ours) -> None:
    turns = as_dicts(CONVERSATIONS["multi_turn"])
    llama = Tokenizer(FILES["v1"], chat_template="llama2-sys")
    assert llama.apply_chat_template(turns) == ours["v1"].apply_chat_template(turns)


def test_unknown_chat_template_rejected() -> None:
    with pytest.raises(ValueError, match="chat template"):
        Tokenizer(FILES["v1"], chat_template="chatml")  # type: ignore[arg-type]


@pytest.mark.parametrize(("version", "vocab_size"), [("v1", 32000), ("v3", 32768)])
def test_special_ids_and_vocab(ours, version: str, vocab_size: int) -> None:
    tokenizer = ours[version]
    assert tokenizer.vocab_size == vocab_size
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_encode_decode_round_trip(ours, version: str, text: str) -> None:
    tokenizer = ours[version]
    ids = tokenizer.encode(text)
    assert tokenizer.bos_id not in ids
    assert tokenizer.encode(text, add_bos=True) == [tokenizer.bos_id, *ids]
    assert tokenizer.decode(ids) == text
    # bos, eos and control ids decode to nothing.
    assert tokenizer.decode([tokenizer.bos_id, *ids, tokenizer.eos_id]) == text


def test_decode_skips_control_tokens(ours) -> None:
    v3 = ours["v3"]
    ids = v3.apply_chat_template([{"role": "user", "content": "Hello world"}])
    assert v3.decode(ids) == "Hello world"


def stream(tokenizer: Tokenizer, prompt: list[int], output: list[int], continuation: bool, chunk: int = 1) -> list[str]:
    detok = tokenizer.detokenizer(prompt, continuation=continuation)
    deltas = [detok.step(output[i : i + chunk]) for i in range(0, len(output), chunk)]
    assert detok.text == "".join(deltas)
    return deltas


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("text", STREAM_TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_stream_chat_equals_decode(ours, version: str, text: str, chunk: int) -> None:
    tokenizer = ours[version]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Say something."}])
    output = tokenizer.encode(text) + [tokenizer.eos_id]
    deltas = stream(tokenizer, prompt, output, continuation=False, chunk=chunk)
    assert "".join(deltas) == tokenizer.decode(output)
    assert all("\ufffd" not in delta for delta in deltas)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_continuation_equals_decode_difference(ours, version: str, text: str) -> None:
    tokenizer = ours[version]
    prompt = tokenizer.encode("A few words: naïve 🦙", add_bos=True)
    output = tokenizer.encode(text)
    deltas = stream(tokenizer, prompt, output, continuation=True)
    full, prompt_text = tokenizer.decode(prompt + output), tokenizer.decode(prompt)
    assert full.startswith(prompt_text)
    assert "".join(deltas) == full[len(prompt_text) :]
    assert all("\ufffd" not in delta for delta in deltas)


@pytest.mark.parametrize("version", VERSIONS)
def test_split_characters_are_held_back(ours, version: str) -> None:
    tokenizer = ours[version]
    output = tokenizer.encode("a🦙b")
    byte_ids = [i for i in output if tokenizer._sp.IsByte(i)]
    assert len(byte_ids) == 4  # the llama is spelled as four byte-fallback ids
    deltas = stream(tokenizer, [], output, continuation=False)
    assert deltas == ["a", "", "", "", "🦙", "b"]


@pytest.mark.parametrize("version", VERSIONS)
def test_first_token_leading_space(ours, version: str) -> None:
    tokenizer = ours[version]
    paris = tokenizer.encode("Paris")
    assert tokenizer._sp.IdToPiece(paris[0]) == "▁Paris"
    prompt = tokenizer.encode("The capital of France is", add_bos=True)
    assert tokenizer.detokenizer(prompt, continuation=True).step(paris) == " Paris"
    assert tokenizer.detokenizer(prompt, continuation=False).step(paris) == "Paris"


@pytest.mark.parametrize("version", VERSIONS)
def test_every_piece_streams_as_decode_says(ours, version: str) -> None:
    """The detokenizer's table path (one plain piece after emitted context) against SentencePiece's
    Decode, for every id after contexts ending in a word, a lone space piece and a byte-fallback
    character."""
    tokenizer = ours[version]
    sp = tokenizer._sp
    for context in (tokenizer.encode("Hello"), [sp.PieceToId("\u2581")], tokenizer.encode("a🦙")):
        before = sp.Decode(context)
        for i in range(tokenizer.vocab_size):
            if sp.IsByte(i):  # held back or joined with its neighbours: test_split_characters_are_held_back
                continue
            delta = tokenizer.detokenizer(context, continuation=True).step([i])
            assert delta == sp.Decode(context + [i])[len(before):], (context, i, sp.IdToPiece(i))


def test_plain_pieces_stream_without_decoding(ours) -> None:
    tokenizer = ours["v3"]
    calls: Counter[str] = Counter()

    class Counting:
        def __getattr__(self, name: str) -> Any:
            calls[name] += 1
            return getattr(tokenizer._sp, name)

    detok = tokenizer.detokenizer(tokenizer.encode("Say", add_bos=True), continuation=True)
    detok._sp = Counting()
    assert "".join(detok.step([i]) for i in tokenizer.encode("hello world, again")) == " hello world, again"
    assert calls["Decode"] == 0


def test_control_ids_mid_stream_do_not_eat_spaces(ours) -> None:
    tokenizer = ours["v3"]
    output = tokenizer.encode("one") + [tokenizer.eos_id, 3] + tokenizer.encode("two")
    assert "".join(stream(tokenizer, [], output, continuation=False)) == tokenizer.decode(output) == "one two"
    prompt = tokenizer.encode("Count:", add_bos=True) + [4]
    assert tokenizer.detokenizer(prompt, continuation=True).step(tokenizer.encode("one")) == " one"


def test_invalid_bytes_are_not_held_forever(ours) -> None:
    tokenizer = ours["v1"]
    output = tokenizer.encode("ok") + [tokenizer._sp.PieceToId("<0x80>")]
    deltas = stream(tokenizer, [], output, continuation=False)
    assert "".join(deltas) == tokenizer.decode(output) == "ok\ufffd"


def test_detokenizer_window_stays_small(ours) -> None:
    tokenizer = ours["v3"]
    output = tokenizer.encode(" ".join(STREAM_TEXTS) * 20)
    detok = tokenizer.detokenizer(tokenizer.encode("prompt " * 500), continuation=True)
    longest = 0
    for token in output:
        detok.step([token])
        longest = max(longest, len(detok._ids))
    assert len(output) > 1000
    assert longest <= 8


def test_from_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.model") as error:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(error.value)
    shutil.copy(FILES["v1"], tmp_path / "tokenizer.model.v1")
    shutil.copy(FILES["v3"], tmp_path / "tokenizer.model.v3")
    assert Tokenizer.from_dir(tmp_path).vocab_size == 32768  # newest versioned file
    shutil.copy(FILES["v1"], tmp_path / "tokenizer.model")
    assert Tokenizer.from_dir(tmp_path, chat_template="llama2-sys").vocab_size == 32000


# ---- tools -----------------------------------------------------------------------------------
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                   "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "Local time",
                                          "parameters": {"type": "object", "properties": {}}}}
TOOL_CONVERSATIONS = {
    "ask": [{"role": "system", "content": "Use tools when they help."},
            {"role": "user", "content": "Weather in Paris?"}],
    "call_and_result": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "a1b2c3d4e", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "a1b2c3d4e", "content": "22 C, sunny"}],
    "parallel_calls_then_more_turns": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather and time in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "zzzzzzzz1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "c"}'}},
            {"id": "zzzzzzzz2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "zzzzzzzz1", "content": "-3 C"},
        {"role": "tool", "tool_call_id": "zzzzzzzz2", "content": "14:05"},
        {"role": "assistant", "content": "-3 C at 14:05."},
        {"role": "user", "content": "And in Rome?"}],
}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", sorted(TOOL_CONVERSATIONS))
def test_tool_conversations_match_mistral_common(ours, reference, version: str, name: str) -> None:
    """Exactly mistral_common's tokens, tools and all. v1 (8x7B) has no tool format: as in
    mistral_common, the tools are left out and tool calls or results are an error."""
    messages = TOOL_CONVERSATIONS[name]
    tools = [WEATHER, CLOCK]
    try:
        expected = reference[(version, ValidationMode.test)].encode_chat_completion(
            ChatCompletionRequest.from_openai(messages, tools=tools)).tokens
    except MistralCommonException:
        assert version == "v1" and name != "ask"
        with pytest.raises(ChatTemplateError, match="Tools not implemented"):
            ours[version].apply_chat_template(messages, tools=tools)
        return
    assert ours[version].apply_chat_template(messages, tools=tools) == expected
    if version == "v3":
        assert ours["v3"].tool_calls_id in expected or name == "ask"
    else:
        assert ours["v1"].tool_calls_id is None


def test_foreign_tool_call_ids_pair_up(ours) -> None:
    """OpenAI-style ids ("call_...") become Mistral's 9-character form, the same for a call and its result."""
    messages = [dict(m) for m in TOOL_CONVERSATIONS["call_and_result"]]
    messages[1] = messages[1] | {"tool_calls": [messages[1]["tool_calls"][0] | {"id": "call_Xy12_long"}]}
    messages[2] = messages[2] | {"tool_call_id": "call_Xy12_long"}
    ids = ours["v3"].apply_chat_template(messages, tools=[WEATHER])
    assert ours["v3"].decode(ids)  # renders
    with pytest.raises(ChatTemplateError, match="tool_call_id"):
        ours["v3"].apply_chat_template(messages[:2] + [{"role": "tool", "content": "x"}], tools=[WEATHER])


def test_llama2_sys_has_no_tool_format() -> None:
    llama = Tokenizer(FILES["v3"], chat_template="llama2-sys")
    with pytest.raises(ChatTemplateError, match="no tool format"):
        llama.apply_chat_template(TOOL_CONVERSATIONS["ask"], tools=[WEATHER])
