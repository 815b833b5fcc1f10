"""One generated sequence: its tokens, its KV blocks and where it stands in the schedule."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from engine.lora_request import LoRARequest
from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from llguidance import LLMatcher
from engine.tokenizer import IncrementalDetokenizer

FinishReason = str  # "stop" | "length" | "abort" | "error"

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int  # which of the request's `n` choices
    token_ids: list[int]  # prompt followed by generated tokens
    num_prompt_tokens: int
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    priority: int = 0
    # n > 1: siblings wait until the first choice has prefilled the prompt, then reuse its
    # cached blocks instead of computing the prompt again.
    parent: "Sequence | None" = None
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    arrival_time: float = field(default_factory=time.monotonic)
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_prompt_tokens: int = 0  # prompt tokens served by the prefix cache (last admission)
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or token that ended it
    logprobs: list[TokenLogprob] = field(default_factory=list)
    matcher: "LLMatcher | None" = None  # where a constrained sequence stands in its grammar
    lora: LoRARequest | None = None  # the adapter it runs with
    lora_slot: int = -1  # the device slot holding that adapter while it runs
    text: str = ""  # detokenized output, stop string removed
    num_text_emitted: int = 0  # characters of `text` already streamed

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def in_prefill(self) -> bool:
        """True until every token but the newest sampled one has its K/V cached."""
        return self.num_computed_tokens < self.num_tokens - 1
