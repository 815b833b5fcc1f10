"""How one request samples: `SamplingParams`, with every bound a request must keep.

Defined once, here (torch-free): the engine's sampler reads it, the serving layer validates
requests into it at its edge and the OpenAI schemas take their bounds from it.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.structured_output import StructuredOutput

MAX_LOGPROBS = 20  # OpenAI's cap on `top_logprobs`
MAX_N = 128  # choices per request, as OpenAI caps `n`


class SamplingParams(BaseModel):
    """How one request samples. Field names and semantics follow vLLM / the OpenAI API."""

    # NOTE: allow_inf_nan=False: an inf temperature or NaN top_p would silently produce
    # NaN probabilities rather than an error.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    n: int = Field(default=1, ge=1, le=MAX_N)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)  # 0 = greedy; OpenAI's range
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=-1, ge=-1)  # -1 or 0 = off
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)  # over prompt and output tokens
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)  # over output tokens
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)  # over output tokens
    seed: int | None = None
    stop: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    stop_token_ids: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list)
    max_tokens: int | None = Field(default=16, ge=1)  # None = up to the context limit
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    # How many top logprobs to report besides the sampled token's own; None = off.
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    skip_special_tokens: bool = True
    # The text must match this (JSON schema, regex, choice, grammar); None = free text.
    structured_output: StructuredOutput | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        # The OpenAI API accepts a single string or null as well as a list.
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_min_tokens(self) -> "SamplingParams":
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )
