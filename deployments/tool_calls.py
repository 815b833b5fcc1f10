"""The model's tool calls as OpenAI's `tool_calls`, whole or streamed.

Mistral models write calls as a JSON list after their [TOOL_CALLS] control token (the replica
routes that text to `ChoiceChunk.tool_text`): `[{"name": "f", "arguments": {...}}, ...]`. A
`ToolCallParser` takes that text in pieces and hands out each call as soon as its object closes,
so a stream sends every call in one delta (index, id, type, name and its whole arguments) and the
openai client's stream accumulation rebuilds exactly the calls of the non-streamed answer.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    """Mistral's form (9 letters or digits), so the id pairs with its result in the next turn."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(9))


def openai_call(call: Any) -> dict[str, Any] | None:
    """One parsed call in OpenAI's shape; None when it is not a {"name", "arguments"} object."""
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", {})
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": new_call_id(), "type": "function", "function": {"name": call["name"], "arguments": text}}


@dataclass
class ToolCallParser:
    """Scans the tool-call text for the list's top-level objects, across pieces."""

    text: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)
    _pos: int = 0  # next character to scan
    _depth: int = 0  # brackets and braces open
    _in_string: bool = False
    _escaped: bool = False
    _start: int | None = None  # where the current top-level object began
    _broken: bool = False  # not a list of calls: everything stays text

    def feed(self, piece: str) -> list[dict[str, Any]]:
        """The calls that `piece` completed, in order (also kept in `calls`)."""
        self.text += piece
        done: list[dict[str, Any]] = []
        while self._pos < len(self.text) and not self._broken:
            ch = self.text[self._pos]
            if self._in_string:
                self._escaped, self._in_string = (False, True) if self._escaped else (ch == "\\", ch != '"')
            elif ch == '"':
                self._in_string = True
            elif ch in "[{":
                if self._depth == 1 and ch == "{":
                    self._start = self._pos
                self._depth += 1
            elif ch in "]}":
                self._depth -= 1
                if self._depth == 1 and ch == "}" and self._start is not None:
                    done += self._complete(self.text[self._start:self._pos + 1])
                    self._start = None
            elif self._depth == 0 and not ch.isspace():
                self._broken = True  # text before the list: not calls
            self._pos += 1
        self.calls += done
        return done

    def _complete(self, obj: str) -> list[dict[str, Any]]:
        try:
            call = openai_call(json.loads(obj))
        except json.JSONDecodeError:
            call = None
        if call is None:
            self._broken = True
            return []
        return [call]

    def leftover(self) -> str:
        """At the end: the text when it held no call (nothing of a reply is lost), else ""."""
        return self.text if not self.calls else ""
