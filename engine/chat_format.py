"""Mistral's chat format, rendered by mistral_common itself: system prompts, turns, tools, the
assistant's tool calls and their results, exactly as Mistral's own code encodes them.

NOTE: mistral_common at run time, not a copy of its rules: the format differs per tokenizer
version (v1 folds the system prompt into the first turn and has no tool format; v3 puts it in
the last turn and has [AVAILABLE_TOOLS] / [TOOL_CALLS] / [TOOL_RESULTS] control tokens), and a
second implementation could only drift. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.normalize import get_normalizer
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode, get_validator
from mistral_common.tokens.tokenizers.base import TokenizerVersion
from mistral_common.tokens.tokenizers.instruct import InstructTokenizerV1, InstructTokenizerV2, InstructTokenizerV3
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer
from pydantic import ValidationError

_INSTRUCT = {TokenizerVersion.v1: InstructTokenizerV1, TokenizerVersion.v2: InstructTokenizerV2,
             TokenizerVersion.v3: InstructTokenizerV3}
_CALL_ID = re.compile(r"[a-zA-Z0-9]{9}")  # what Mistral's format accepts as a tool call id
TOOL_CALLS_TOKEN = "[TOOL_CALLS]"


class ChatTemplateError(ValueError):
    """The conversation cannot be rendered with the chat template."""


def mistral_call_id(call_id: str) -> str:
    """A tool call id in Mistral's form (9 letters or digits): ours already are; another client's
    ("call_...") maps to a stable one, so a call and its result still pair up."""
    return call_id if _CALL_ID.fullmatch(call_id) else hashlib.sha256(call_id.encode()).hexdigest()[:9]


class MistralChat:
    """mistral_common's encoder for one SentencePiece file of a known version."""

    def __init__(self, model_file: Path, version: TokenizerVersion) -> None:
        if version not in _INSTRUCT:
            raise ValueError(f"{model_file}: tokenizer {version.value} is not a Mixtral tokenizer (v1-v3)")
        raw = SentencePieceTokenizer(model_file, tokenizer_version=version)
        instruct = _INSTRUCT[version](raw)
        normalizer = get_normalizer(version, raw.model_settings_builder)
        # Test mode wants a conversation to answer; finetuning mode one that ends with the answer.
        self._prompt, self._finished = (
            MistralTokenizer(instruct, validator=get_validator(version, mode), request_normalizer=normalizer)
            for mode in (ValidationMode.test, ValidationMode.finetuning))
        self.version = version
        self.tool_calls_id: int | None = (raw.get_special_token(TOOL_CALLS_TOKEN)
                                          if version != TokenizerVersion.v1 else None)

    @property
    def has_tools(self) -> bool:
        """Whether the format carries tools (v1, Mixtral-8x7B's, has none: mistral_common drops them)."""
        return self.tool_calls_id is not None

    def tool_call_grammar(self, tools: list[dict[str, Any]], name: str | None, parallel: bool) -> str:
        """A Lark grammar (llguidance's) for a reply that is tool calls only: [TOOL_CALLS] (where the
        format has it) then a JSON list of {"name", "arguments"}, each naming a declared function (or
        `name`) with arguments valid under that function's `parameters` schema."""
        calls = []
        for tool in tools:
            function = tool["function"]
            if name is not None and function["name"] != name:
                continue
            calls.append({"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                          "properties": {"name": {"const": function["name"]},
                                         "arguments": function.get("parameters") or {"type": "object"}}})
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls},
                  # Mistral's own spacing (Python's json.dumps), and no free whitespace to wander in.
                  "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}}
        schema |= {} if parallel else {"maxItems": 1}
        start = f'<[{self.tool_calls_id}]> " "?' if self.tool_calls_id is not None else ""
        return f"start: {start} calls\ncalls: %json {json.dumps(schema)}\n"

    def encode(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
               add_generation_prompt: bool) -> list[int]:
        """Prompt ids; ChatTemplateError naming mistral_common's objection when it refuses."""
        answered = bool(messages) and messages[-1].get("role") == "assistant"
        if add_generation_prompt and answered:
            raise ChatTemplateError("last message is from the assistant; a generation prompt needs a final user "
                                    "or tool message (pass add_generation_prompt=False to encode a finished "
                                    "conversation)")
        encoder = self._finished if answered else self._prompt
        try:
            request = ChatCompletionRequest.from_openai([_with_mistral_ids(m) for m in messages], tools=tools)
            return encoder.encode_chat_completion(request).tokens
        except KeyError as err:
            raise ChatTemplateError(f"a message lacks its {err} field") from None
        except (MistralCommonException, ValidationError, ValueError, TypeError) as err:
            raise ChatTemplateError(f"the conversation does not fit Mistral's chat format: {err}") from None


def _with_mistral_ids(message: dict[str, Any]) -> dict[str, Any]:
    """The message with its tool call ids (or its result's) in Mistral's form."""
    if message.get("tool_call_id"):
        message = message | {"tool_call_id": mistral_call_id(message["tool_call_id"])}
    if message.get("tool_calls"):
        message = message | {"tool_calls": [call | {"id": mistral_call_id(call.get("id") or "")}
                                             for call in message["tool_calls"]]}
    return message
