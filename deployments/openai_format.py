"""Turns replica chunks into OpenAI response bodies: whole responses and stream (SSE) chunks.

One `ResponseBuilder` per HTTP request. A request may fan out over several prompts (a batch
completion), each answered with `n` choices: the OpenAI choice index is
`prompt_index * n + choice`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from deployments.protocol import ChoiceChunk, GenerateChunk, TokenLogprob
from deployments.tool_calls import ToolCallParser

Kind = Literal["completion", "chat"]


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    text_offset: int = 0  # completions logprobs: characters before the next token
    started: bool = False  # chat streams: the first delta carries the role
    tool_calls: ToolCallParser = field(default_factory=ToolCallParser)

    def finish(self, reason: str | None) -> str | None:
        """OpenAI's finish reason: a reply that ended in calls finished with "tool_calls"."""
        return "tool_calls" if reason == "stop" and self.tool_calls.calls else reason


class ResponseBuilder:
    def __init__(self, kind: Kind, response_id: str, model: str, n: int, num_prompts: int,
                 logprobs: bool, include_usage: bool) -> None:
        self.kind = kind
        self.id = response_id
        self.model = model
        self.created = int(time.time())
        self.n = n
        self.logprobs = logprobs
        self.include_usage = include_usage
        self._choices = [_Choice() for _ in range(n * num_prompts)]
        self._prompt_tokens = [0] * num_prompts
        self._output_tokens = [0] * num_prompts
        self._cached_tokens = [0] * num_prompts

    # ---- accounting ----------------------------------------------------------------------
    def _count(self, prompt_index: int, chunk: GenerateChunk) -> None:
        self._prompt_tokens[prompt_index] = chunk.num_prompt_tokens
        self._output_tokens[prompt_index] = chunk.num_output_tokens
        self._cached_tokens[prompt_index] = chunk.num_cached_tokens

    def usage(self) -> dict[str, Any]:
        prompt, completion = sum(self._prompt_tokens), sum(self._output_tokens)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(self._cached_tokens)},
        }

    def _header(self, stream: bool) -> dict[str, Any]:
        if self.kind == "completion":
            obj = "text_completion"
        else:
            obj = "chat.completion.chunk" if stream else "chat.completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    # ---- logprobs --------------------------------------------------------------------------
    def _logprobs(self, state: _Choice, items: list[TokenLogprob]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        if self.kind == "chat":
            return {"content": [
                {"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token.encode()),
                 "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in lp.top]}
                for lp in items
            ]}
        offsets = []
        for lp in items:
            offsets.append(state.text_offset)
            state.text_offset += len(lp.token)
        return {
            "tokens": [lp.token for lp in items],
            "token_logprobs": [lp.logprob for lp in items],
            "top_logprobs": [dict(lp.top) for lp in items],
            "text_offset": offsets,
        }

    # ---- streaming -------------------------------------------------------------------------
    def stream_chunk(self, prompt_index: int, chunk: GenerateChunk) -> dict[str, Any] | None:
        """One SSE payload with every choice that has news in `chunk` (None if none has)."""
        self._count(prompt_index, chunk)
        choices = []
        for part in chunk.choices:
            index = prompt_index * self.n + part.index
            state = self._choices[index]
            first_call = len(state.tool_calls.calls)
            calls = state.tool_calls.feed(part.tool_text) if part.tool_text else []
            text = part.text + (state.tool_calls.leftover() if part.finish_reason else "")
            if not (text or calls or part.finish_reason or part.logprobs):
                continue
            body: dict[str, Any] = {"index": index}
            if self.kind == "chat":
                delta: dict[str, Any] = {"content": text} if text or not calls else {}
                if calls:  # each call whole: index, id, type, name and all its arguments
                    delta["tool_calls"] = [{"index": first_call + k, **call} for k, call in enumerate(calls)]
                if not state.started:
                    delta = {"role": "assistant", **delta}
                    state.started = True
                body["delta"] = delta
            else:
                body["text"] = text
            body["logprobs"] = self._logprobs(state, part.logprobs)
            body["finish_reason"] = state.finish(part.finish_reason)
            body["stop_reason"] = part.stop_reason
            choices.append(body)
        if not choices:
            return None
        payload = {**self._header(stream=True), "choices": choices}
        if self.include_usage:
            payload["usage"] = None
        return payload

    def usage_chunk(self) -> dict[str, Any]:
        return {**self._header(stream=True), "choices": [], "usage": self.usage()}

    # ---- whole responses -------------------------------------------------------------------
    def add(self, prompt_index: int, chunk: GenerateChunk) -> None:
        self._count(prompt_index, chunk)
        for part in chunk.choices:
            self._merge(self._choices[prompt_index * self.n + part.index], part)

    @staticmethod
    def _merge(state: _Choice, part: ChoiceChunk) -> None:
        state.text.append(part.text)
        state.tool_calls.feed(part.tool_text)
        state.logprobs.extend(part.logprobs)
        if part.finish_reason is not None:
            state.finish_reason = part.finish_reason
            state.stop_reason = part.stop_reason

    def response(self) -> dict[str, Any]:
        choices = []
        for index, state in enumerate(self._choices):
            text = "".join(state.text) + state.tool_calls.leftover()
            body: dict[str, Any] = {"index": index}
            if self.kind == "chat":
                calls = state.tool_calls.calls
                body["message"] = {"role": "assistant", "content": text or None, "tool_calls": calls} if calls \
                    else {"role": "assistant", "content": text}
            else:
                body["text"] = text
            body["logprobs"] = self._logprobs(state, state.logprobs)
            body["finish_reason"] = state.finish(state.finish_reason)
            body["stop_reason"] = state.stop_reason
            choices.append(body)
        return {**self._header(stream=False), "choices": choices, "usage": self.usage()}
