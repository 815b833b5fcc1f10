"""The model replica: one deployment class, one instance per configured tier, each owning one engine.

It speaks `deployments.protocol` to the router, reports its engine queue to the autoscaler,
takes live scheduler knobs through `reconfigure()` (the tier's flush interval among them: the
engine core hands a stream's deltas over in that rhythm) and turns them into chunks. Tensors
never leave it; it never imports torch itself.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import ray
from ray import serve

from deployments.protocol import (
    ChoiceChunk,
    ErrorInfo,
    GenerateChunk,
    GenerateRequest,
    Reply,
    Tokenized,
    TokenizeJob,
    TokenLogprob,
)
from deployments.replica_metrics import ReplicaMetrics
from deployments.stream_channel import ChannelClient
from deployments.tp_workers import RayRankLauncher
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig, SchedulerConfig
from engine.lora_request import LoRARequest
from engine.outputs import (
    EngineDeadError,
    RequestError,
    RequestFailedError,
    RequestOutput,
)
from engine.ranks import RankPlacement
from engine.structured_output import StructuredOutput
from engine.tokenizer import ChatTemplateError

log = logging.getLogger("ray.serve")

# Serve's record of the adapters a replica holds (what its model multiplexing routes by): the most
# recently used this many; the engine's own caches (`engine.lora`) decide what stays in memory.
_ADAPTERS_PER_REPLICA = 16


# NOTE: helpers come before the deployment class: `@serve.deployment` pickles the class when it
# is decorated, and globals defined after that point would be missing in the replica.

class _ChunkState:
    """Per-request memory across chunks."""

    def __init__(self, want_logprobs: bool, tool_calls_id: int | None = None, all_tool_text: bool = False) -> None:
        self.want_logprobs = want_logprobs
        self.queue_seconds: float | None = None
        # Tool calls: text after this control token is the calls' JSON (ChoiceChunk.tool_text); with
        # `all_tool_text` (a forced call in a format without the token) the whole reply is.
        self.tool_calls_id = tool_calls_id
        self.in_tool_calls: set[int] = set()  # choice indexes past the token
        self.all_tool_text = all_tool_text


# NOTE: vLLM's floor for log(0): tokens that top-k / top-p / min-p filtered out have -inf, which
# JSON cannot carry (found by the Schemathesis test: a 500 from the response encoder).
_MIN_LOGPROB = -9999.0


def _finite(logprob: float) -> float:
    return max(_MIN_LOGPROB, logprob)


@serve.deployment
class ModelReplica:
    def __init__(self, tier: str, config: EngineConfig, engine_stall_s: float,
                 drain_timeout_s: float, metric_buckets: dict[str, tuple[float, ...]]) -> None:
        self.tier = tier
        # Tensor-parallel ranks > 0 run as actors in this replica's placement group, each with
        # the share of resources its bundle holds (the same as this replica's own).
        resources = ray.get_runtime_context().get_assigned_resources()
        launcher = RayRankLauncher(resources.get("CPU", 0.0), resources.get("GPU", 0.0))
        # NOTE: the node's address, not loopback: a SPREAD placement puts ranks on other nodes; and
        # Ray shows each rank only its own GPU.
        placement = RankPlacement(host=ray.util.get_node_ip_address(), own_devices=True)
        self.engine = AsyncEngine(config, launcher, placement)
        self.tokenizer = self.engine.tokenizer
        self.metrics = ReplicaMetrics(tier, self.engine.stats, metric_buckets)
        self.channel = ChannelClient()  # streamed chunks to the routers
        self.engine_stall_s = engine_stall_s
        self.drain_timeout_s = drain_timeout_s
        self._draining = False
        self._drained = False
        self._active: set[str] = set()  # request ids between admission and their end
        self._waiting_first_token: dict[str, float] = {}  # request id -> arrival (for TTFT breaches)
        # Token text for logprobs: decoded after a fixed context so a leading space survives.
        self._context_id = self.tokenizer.encode("a")[-1]
        self._context_len = len(self.tokenizer.decode([self._context_id]))
        self._token_texts: dict[int, str] = {}  # bounded by the vocabulary
        self._adapters_checked: set[str] = set()  # LoRARequest keys this replica checked
        gc.freeze()  # what start-up left, out of the collector's walks (as the engine core: engine/engine_core.py)

    # ---- Serve hooks -----------------------------------------------------------------------
    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Live tuning: the engine applies new scheduler knobs between two steps."""
        tuning = SchedulerConfig.model_validate(user_config)
        await self.engine.start()  # on the replica's event loop, so the knobs apply now, not at the first request
        self.engine.reconfigure(tuning)
        log.info("tier %s reconfigured: %s", self.tier, tuning.model_dump())

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The queue-depth policy's signal (deployments/autoscaling.py)."""
        stats = self.engine.stats()
        breaches = 0
        target_ms = self.engine.tuning.ttft_target_ms
        if target_ms is not None:
            oldest_allowed = time.monotonic() - target_ms / 1000
            breaches = sum(1 for t in self._waiting_first_token.values() if t < oldest_allowed)
        return {"queue_depth": float(stats.num_waiting + stats.num_running), "ttft_breaches": float(breaches)}

    def check_health(self) -> None:
        self.engine.check_health(self.engine_stall_s)
        if self._drained:
            # NOTE: a drained replica asks to be replaced rather than serving 503s forever.
            raise RuntimeError(f"tier {self.tier}: replica drained")

    async def drain(self) -> dict[str, int]:
        """Refuses new requests (503 `draining`), lets those in flight finish for up to the
        tier's graceful_shutdown_timeout_s, aborts the rest; then fails health checks so Serve
        replaces the replica."""
        self._draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_timeout_s
        in_flight = len(self._active)
        while self._active and loop.time() < deadline:
            await asyncio.sleep(0.05)
        aborted = list(self._active)
        for request_id in aborted:
            await self.engine.abort(request_id)
        self._drained = True
        log.info("tier %s drained: %d in flight, %d aborted", self.tier, in_flight, len(aborted))
        return {"in_flight": in_flight, "aborted": len(aborted)}

    async def ping(self) -> str:
        return "ok"

    def describe(self) -> dict[str, Any]:
        """What an operator (or a test) wants to see of this replica."""
        stats = self.engine.stats()
        return {
            "tier": self.tier,
            "replica_id": serve.get_replica_context().replica_id.unique_id,
            "tuning": self.engine.tuning.model_dump(),
            "cpu_threads": self.engine.cpu_threads,
            "num_waiting": stats.num_waiting,
            "num_running": stats.num_running,
            "kv_usage": stats.kv_usage,
            "kv_blocks_used": stats.kv_blocks_used,
            "last_step_seconds": stats.last_step_seconds,
            "steps_total": stats.steps_total,
            "stream_frames_sent": self.channel.frames_sent,  # what a step's streams cost the path
            "latency_fit": self.engine.latency_fit(),
        }

    # ---- tokens ----------------------------------------------------------------------------
    def tokenize(self, job: TokenizeJob) -> Tokenized | ErrorInfo:
        """A prompt's ids, or a conversation's through the chat template (as generation sees them)."""
        try:
            if job.messages is not None:
                ids = self.tokenizer.apply_chat_template(job.messages, job.add_generation_prompt, job.tools)
            else:
                assert job.prompt is not None
                ids = self.tokenizer.encode(job.prompt, add_bos=job.add_special_tokens)
        except ChatTemplateError as err:
            return ErrorInfo(400, str(err), param="messages")
        return Tokenized(ids, [self._token_text(i) for i in ids] if job.return_token_strs else None)

    def detokenize(self, tokens: list[int]) -> str | ErrorInfo:
        vocab = self.tokenizer.vocab_size
        if bad := [t for t in tokens if not 0 <= t < vocab]:
            return ErrorInfo(400, f"token ids outside the vocabulary (0-{vocab - 1}): {bad[:5]}", param="tokens")
        return self.tokenizer.decode(tokens)

    # ---- adapters --------------------------------------------------------------------------
    async def check_adapter(self, lora: LoRARequest) -> ErrorInfo | None:
        """None when this tier's engines can serve the adapter; else a 400 naming the problem."""
        try:
            await asyncio.to_thread(self.engine.check_adapter, lora)  # reads files: off the event loop
        except RequestError as err:
            return ErrorInfo(400, str(err), param=err.param)
        self._adapters_checked.add(lora.key)
        return None

    @serve.multiplexed(max_num_models_per_replica=_ADAPTERS_PER_REPLICA)
    async def _hold_adapter(self, name: str) -> str:
        """Tells Serve this replica holds the adapter (the engine reads it on the request's behalf)."""
        return name

    # ---- generation ------------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> Reply:
        """Runs one prompt: each chunk of new output goes to the router's stream channel as it is made
        (`request.reply_to`; deployments/stream_channel.py); the last, or an `ErrorInfo`, is the result.
        Cancelling the call aborts the request."""
        sent = 0
        last: GenerateChunk | ErrorInfo | None = None
        if request.reply_to is not None:
            await self.channel.connect(request.reply_to)
        async with aclosing(self._chunks(request)) as chunks:
            async for item in chunks:
                if isinstance(item, ErrorInfo) or item.finished or request.reply_to is None:
                    last = item
                    continue
                self.channel.send(request.reply_to, request.request_id, item)
                sent += 1
                await self.channel.writable(request.reply_to)
        assert last is not None, "a request's chunks end with a finished chunk or an error"
        return Reply(last, sent)

    async def _chunks(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk | ErrorInfo]:
        """Chunks of new output until the request finishes; an `ErrorInfo` instead on failure."""
        if self._draining:
            yield ErrorInfo(503, "This replica is draining; retry the request.", type="service_unavailable_error",
                            code="draining")
            return
        params = request.params
        tools = request.tools
        try:
            if request.messages is not None:
                prompt: str | list[int] = self.engine.encode_chat(request.messages, tools and tools.tools)
            else:
                assert request.prompt is not None
                prompt = request.prompt
        except ChatTemplateError as err:
            yield ErrorInfo(400, str(err), param="messages")
            return
        if request.lora is not None:
            if request.lora.key not in self._adapters_checked and (error := await self.check_adapter(request.lora)):
                yield error
                return
            await self._hold_adapter(request.lora.name)
        tool_calls_id = self.tokenizer.tool_calls_id if tools else None
        if tools and tool_calls_id is None and not tools.required:
            yield ErrorInfo(400, "this model's chat format has no tool calls (Mistral tokenizer v1, e.g. "
                                 "Mixtral-8x7B): set tool_choice to 'required' or name a function, which the "
                                 "reply is then constrained to", param="tool_choice")
            return
        if tools and tools.required:  # the grammar makes the reply valid calls to the declared functions
            grammar = self.tokenizer.tool_call_grammar(tools.tools, tools.name, tools.parallel)
            params = params.model_copy(update={"structured_output": StructuredOutput(grammar=grammar)})
        self._waiting_first_token[request.request_id] = time.monotonic()
        self._active.add(request.request_id)
        state = _ChunkState(params.logprobs is not None, tool_calls_id, bool(tools and tools.required)
                            and tool_calls_id is None)
        try:
            # Closing the engine's stream (finished, failed or the client left) aborts the request.
            async with aclosing(self.metrics.track(self.engine.stream(
                request.request_id, prompt, params, request.priority, continuation=request.messages is None,
                lora=request.lora, whole=request.reply_to is None,
            ), params.n, request.lora and request.lora.name)) as outputs:
                async for batch in outputs:
                    self._waiting_first_token.pop(request.request_id, None)
                    yield self._chunk(batch, state)
        except RequestError as err:
            yield ErrorInfo(400, str(err), param=err.param)
        except RequestFailedError:
            log.exception("tier %s: request %s failed", self.tier, request.request_id)
            yield ErrorInfo(500, "The request failed inside the engine; it has been logged.",
                            type="internal_server_error", code="internal_error")
        except EngineDeadError:
            yield ErrorInfo(503, "The model engine is not running; retry the request.",
                            type="service_unavailable_error", code="engine_dead")
        finally:
            self._waiting_first_token.pop(request.request_id, None)
            self._active.discard(request.request_id)

    def _chunk(self, batch: list[RequestOutput], state: _ChunkState) -> GenerateChunk:
        choices: dict[int, ChoiceChunk] = {}
        for out in batch:
            if state.queue_seconds is None:
                state.queue_seconds = out.queue_time
            for delta in out.choices:
                choice = choices.setdefault(delta.index, ChoiceChunk(delta.index))
                if state.tool_calls_id is not None and state.tool_calls_id in delta.token_ids:
                    state.in_tool_calls.add(delta.index)
                if state.all_tool_text or delta.index in state.in_tool_calls:
                    choice.tool_text += delta.text
                else:
                    choice.text += delta.text
                choice.num_tokens += len(delta.token_ids)
                if state.want_logprobs:
                    choice.logprobs.extend(
                        TokenLogprob(self._token_text(lp.token_id), _finite(lp.logprob),
                                     [(self._token_text(t), _finite(v)) for t, v in lp.top])
                        for lp in delta.logprobs
                    )
                if delta.finish_reason is not None:
                    choice.finish_reason, choice.stop_reason = delta.finish_reason, delta.stop_reason
        last = batch[-1]
        return GenerateChunk(
            choices=[choices[i] for i in sorted(choices)],
            finished=last.finished,
            num_prompt_tokens=last.num_prompt_tokens,
            num_output_tokens=last.num_output_tokens,
            num_cached_tokens=last.num_cached_tokens,
            queue_seconds=state.queue_seconds,
        )

    def _token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self.tokenizer.decode([self._context_id, token_id])[self._context_len:]
            self._token_texts[token_id] = text
        return text

