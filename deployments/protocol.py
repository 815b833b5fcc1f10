"""What the router and the model replicas send each other through Ray (plain, torch-free data)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.lora_request import LoRARequest
from engine.sampling_params import SamplingParams


@dataclass
class GenerateRequest:
    """One prompt's request, validated once, at the router; the replica hands it to the engine.

    A per-request feature (an adapter, a response format, tools) is one more field here, set by
    the router and read by the replica.
    """

    request_id: str  # the engine's request id: unique per prompt
    params: SamplingParams
    prompt: str | list[int] | None = None  # completions
    messages: list[dict[str, Any]] | None = None  # chat (OpenAI's message dicts): the engine's chat template
    reply_to: ChannelAddress | None = None  # streamed: chunks go to this router channel; None: one, at the end
    priority: int = 0  # lower runs first on a tier whose scheduler policy is "priority"
    tools: ToolUse | None = None  # chat with tools the model may (or must) call
    lora: LoRARequest | None = None  # the adapter `model` named


@dataclass(frozen=True)
class ChannelAddress:
    """Where a router takes streamed chunks (deployments/stream_channel.py); a connection that does
    not first present `token` is dropped."""

    host: str
    port: int
    token: bytes


@dataclass
class ToolUse:
    """A chat request's tools, as the router validated them."""

    tools: list[dict[str, Any]]  # OpenAI's tool objects
    required: bool = False  # the reply must be tool calls ("required", or a named function)
    name: str | None = None  # ... to this function only
    parallel: bool = True  # several calls in one reply


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]]  # most likely first


@dataclass
class ChoiceChunk:
    """New output of one choice since the previous chunk."""

    index: int
    text: str = ""
    num_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    tool_text: str = ""  # the model's tool-call text (Mistral's JSON list), kept out of `text`

    def merge(self, later: ChoiceChunk) -> None:
        """Appends the next chunk's output of the same choice."""
        self.text += later.text
        self.tool_text += later.tool_text
        self.num_tokens += later.num_tokens
        self.logprobs += later.logprobs
        if later.finish_reason is not None:
            self.finish_reason, self.stop_reason = later.finish_reason, later.stop_reason


@dataclass
class GenerateChunk:
    choices: list[ChoiceChunk]
    finished: bool
    num_prompt_tokens: int
    num_output_tokens: int  # all choices, so far
    num_cached_tokens: int
    queue_seconds: float | None  # arrival at the engine to first schedule

    def merge(self, later: GenerateChunk) -> None:
        """Takes in the next chunk of the same prompt: its output appended, its counts and state kept."""
        mine = {c.index: c for c in self.choices}
        for part in later.choices:
            if part.index in mine:
                mine[part.index].merge(part)
            else:
                self.choices.append(part)
        self.choices.sort(key=lambda c: c.index)
        self.finished = later.finished
        self.num_prompt_tokens = later.num_prompt_tokens
        self.num_output_tokens = later.num_output_tokens
        self.num_cached_tokens = later.num_cached_tokens


@dataclass
class Reply:
    """A prompt's call result: its last chunk, or the error that ended it, after `sent` chunks over the
    stream channel."""

    last: GenerateChunk | ErrorInfo
    sent: int


@dataclass
class ErrorInfo:
    """A failure to report to the client in OpenAI's error envelope (see deployments/errors.py)."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


@dataclass
class TokenizeJob:
    """/tokenize, validated by the router; the replica's tokenizer does the work."""

    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


@dataclass
class Tokenized:
    tokens: list[int]
    token_strs: list[str] | None = None
