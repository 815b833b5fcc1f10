"""What a request's output must match: a JSON schema, any JSON object, a regex, one of some
strings or a Lark grammar (vLLM's `structured_outputs` fields), as one llguidance grammar.

Torch-free, like `SamplingParams` which embeds it: the router validates a request's constraint
here, before it reaches a replica, and the engine compiles the same grammar (engine/grammar.py).
"""

from __future__ import annotations

import json
import re
from typing import Any

from llguidance import LLMatcher
from pydantic import BaseModel, ConfigDict, Field, model_validator

# NOTE: compact JSON, no free whitespace between tokens: a model may otherwise spend its whole
# budget on newlines between two keys (random weights do), and the output parses the same.
_JSON_OPTIONS = {"whitespace_flexible": False}
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


class StructuredOutput(BaseModel):
    """Exactly one constraint on the generated text."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    json_schema: dict[str, Any] | None = None
    json_object: bool = False  # any JSON object (OpenAI's response_format json_object)
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None  # Lark syntax, as llguidance reads it

    @model_validator(mode="after")
    def _one_and_valid(self) -> "StructuredOutput":
        given = [name for name in ("json_schema", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(f"give exactly one of json_schema, json_object, regex, choice, grammar (got {given})")
        error = LLMatcher.validate_grammar(self.grammar_text())
        if error:
            raise ValueError(f"invalid {given[0]}: {' '.join(error.split())[:500]}")
        return self

    def grammar_text(self) -> str:
        """The llguidance grammar (also the cache key of its compiled form)."""
        if self.json_schema is not None or self.json_object:
            return LLMatcher.grammar_from_json_schema(json.dumps(self.json_schema or _ANY_OBJECT, sort_keys=True),
                                                      defaults=_JSON_OPTIONS)
        if self.regex is not None:
            return LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:
            return LLMatcher.grammar_from_regex("|".join(re.escape(c) for c in self.choice))
        assert self.grammar is not None
        return LLMatcher.grammar_from_lark(self.grammar)
