"""What the engine hands back each step: per-request deltas and engine statistics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from engine.sequence import FinishReason, TokenLogprob


class RequestError(ValueError):
    """A request the engine refuses up front (too long, bad parameters); `param` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self) -> tuple[type, tuple[str, str | None]]:
        return RequestError, (str(self), self.param)


class RequestFailedError(RuntimeError):
    """The engine failed while serving this request (the engine itself goes on)."""


class EngineDeadError(RuntimeError):
    """The step loop has stopped; no request can make progress."""


class StepFailedError(RuntimeError):
    """One engine step raised: the requests it was running (`request_ids`) cannot go on; every
    other request, waiting or not scheduled in that step, is untouched."""

    def __init__(self, request_ids: list[str], cause: BaseException) -> None:
        super().__init__(f"engine step failed: {type(cause).__name__}: {cause}")
        self.request_ids = request_ids


@dataclass
class ChoiceDelta:
    """New output of one of a request's `n` choices since the previous delta."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None

    # NOTE: outputs cross from the engine core's process every step: positional pickling is
    # ~3x cheaper than a dataclass's default (class, state dict).
    def __reduce__(self) -> tuple[type, tuple]:
        return ChoiceDelta, (self.index, self.token_ids, self.text, self.logprobs, self.finish_reason, self.stop_reason)


@dataclass
class RequestOutput:
    request_id: str
    choices: list[ChoiceDelta]
    finished: bool
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens served by the prefix cache
    num_output_tokens: int  # all choices, so far
    queue_time: float | None = None  # seconds from arrival to first schedule
    error: str | None = None  # set when the engine failed this request
    # time.monotonic() of each engine step whose tokens this carries (one clock for every process of
    # the host): the steps a stream's flush interval held arrive merged into one output
    # (engine/output_hold.py), and its reader still sees when each step's tokens came.
    step_times: list[float] = field(default_factory=lambda: [time.monotonic()])

    def __reduce__(self) -> tuple[type, tuple]:
        return RequestOutput, (self.request_id, self.choices, self.finished, self.num_prompt_tokens,
                               self.num_cached_tokens, self.num_output_tokens, self.queue_time, self.error,
                               self.step_times)

    def merge(self, later: RequestOutput) -> None:
        """Takes in the next output of the same request (neither failed): its tokens, text and
        logprobs appended to each choice's, its state (finished, counts) in place of this one's."""
        for delta in later.choices:
            mine = next((c for c in self.choices if c.index == delta.index), None)
            if mine is None:  # a choice with no token in this output's steps yet
                self.choices.append(delta)
                continue
            mine.token_ids += delta.token_ids
            mine.text += delta.text
            mine.logprobs += delta.logprobs
            mine.finish_reason, mine.stop_reason = delta.finish_reason, delta.stop_reason
        self.finished = later.finished
        self.num_output_tokens = later.num_output_tokens
        self.step_times += later.step_times


@dataclass
class EngineStats:
    num_waiting: int
    num_running: int
    kv_blocks_used: int
    kv_blocks_total: int
    kv_capacity_tokens: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    steps_total: int
    last_step_seconds: float
    last_batch_tokens: int
    last_batch_seqs: int
    expert_tokens: list[list[int]]  # [layer][expert] tokens routed since start
    lora_resident: int = 0  # adapters in the device slots
    lora_slot_loads_total: int = 0  # adapters written into a slot since start
    lora_reads_total: int = 0  # adapters read from disk since start
    lora_read_seconds_total: float = 0.0  # ... and the time those reads took
    healthy: bool = True
    error: str | None = None

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
