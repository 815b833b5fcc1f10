"""OpenAI request bodies (plus vLLM's sampling extras), and how they become the engine's
`SamplingParams`, validated here, once.

Unknown fields are ignored, as OpenAI-compatible servers do (clients send newer fields freely);
fields we know but cannot honour are refused with a 400 naming them. Sampling fields take their
types and bounds from `SamplingParams` itself, so the API and the engine cannot disagree.
"""

from __future__ import annotations

import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deployments.errors import OpenAIError
from engine.sampling_params import SamplingParams


def _engine_type(name: str) -> Any:
    """`SamplingParams.<name>`'s type with its bounds (Optional stripped: the API adds its own)."""
    field = SamplingParams.model_fields[name]
    base = field.annotation
    if get_origin(base) in (Union, types.UnionType):
        base = next(arg for arg in get_args(base) if arg is not type(None))
    return Annotated[(base, *field.metadata)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: _engine_type("n") = 1
    temperature: _engine_type("temperature") | None = None
    top_p: _engine_type("top_p") | None = None
    presence_penalty: _engine_type("presence_penalty") | None = None
    frequency_penalty: _engine_type("frequency_penalty") | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extras
    top_k: _engine_type("top_k") | None = None
    min_p: _engine_type("min_p") | None = None
    repetition_penalty: _engine_type("repetition_penalty") | None = None
    min_tokens: _engine_type("min_tokens") = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    priority: int = 0  # lower runs first on tiers whose scheduler policy is "priority"

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def _sampling(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        if self.logit_bias:
            raise OpenAIError(400, "logit_bias is not supported", param="logit_bias")
        if self.stream_options is not None and not self.stream:
            raise OpenAIError(400, "stream_options is only allowed with stream=true", param="stream_options")
        fields = {
            "n": self.n,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "seed": self.seed,
            "stop": self.stop,
            "stop_token_ids": self.stop_token_ids,
            "max_tokens": max_tokens,
            "min_tokens": self.min_tokens,
            "ignore_eos": self.ignore_eos,
            "logprobs": logprobs,
            "skip_special_tokens": self.skip_special_tokens,
        }
        # Unset fields keep the engine's defaults (which are OpenAI's).
        try:
            return SamplingParams.model_validate({k: v for k, v in fields.items() if v is not None})
        except ValidationError as err:  # what spans fields (min_tokens over max_tokens, ...)
            first = err.errors()[0]
            param = str(first["loc"][0]) if first["loc"] else None
            raise OpenAIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param) from None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: _engine_type("max_tokens") | None = 16
    logprobs: _engine_type("logprobs") | None = None
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt of a batch (a single prompt is a batch of one)."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        if not p:
            raise OpenAIError(400, "prompt is empty", param="prompt")
        return list(p)  # type: ignore[arg-type]

    def sampling(self) -> SamplingParams:
        if self.echo:
            raise OpenAIError(400, "echo is not supported", param="echo")
        if self.suffix:
            raise OpenAIError(400, "suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise OpenAIError(400, "best_of must equal n (no server-side best-of ranking)", param="best_of")
        return self._sampling(self.max_tokens, self.logprobs)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def engine_message(self, index: int) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            if any(part.type != "text" for part in content):
                raise OpenAIError(400, f"messages[{index}]: only text content parts are supported", param="messages")
            content = "".join(part.text or "" for part in content)
        # NOTE: OpenAI's "developer" role is its newer name for the system prompt.
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: _engine_type("max_tokens") | None = None  # None: up to the context length
    max_completion_tokens: _engine_type("max_tokens") | None = None
    logprobs: bool = False
    top_logprobs: _engine_type("logprobs") | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def engine_messages(self) -> list[dict[str, str]]:
        return [m.engine_message(i) for i, m in enumerate(self.messages)]

    def sampling(self) -> SamplingParams:
        if self.tools:
            raise OpenAIError(400, "tools are not supported", param="tools")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise OpenAIError(400, "only response_format type 'text' is supported", param="response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise OpenAIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling(self.max_completion_tokens or self.max_tokens, logprobs)
