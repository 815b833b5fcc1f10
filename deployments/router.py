"""The ingress: OpenAI's HTTP API per tier, routed to the tier's model replicas.

    GET  /health
    GET  /<tier>/v1/models            POST /<tier>/v1/completions   POST /<tier>/v1/chat/completions
    GET  /v1/models, POST /v1/...     (the configured default tier)
    GET  /<tier>/stats                (one replica's view: tuning, queue, latency fit)
    POST /<tier>/tokenize  /<tier>/detokenize  (and /tokenize, /detokenize: vLLM's bodies)

It validates requests (into the engine's `SamplingParams`, a torch-free type), fans batch prompts
out, streams SSE and formats responses; it holds no tensors and its process never loads torch. `x-request-id` (the
client's, else a fresh one) is set on every response by Serve's proxy; handlers add `x-tier`
and the replica's queue time `x-queue-ms`.

NOTE: no `from __future__ import annotations` here: Serve's ingress rebuilds the endpoint
signatures, and FastAPI would then see string annotations and take request bodies for query
parameters.
"""

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.types import Receive, Scope, Send

from deployments.auth import ApiKeyGuard, ApiKeyMiddleware, AuthConfig
from deployments.backpressure import AdmissionConfig, Slot, TierGate
from deployments.body_limit import BodyLimitMiddleware
from deployments.errors import OpenAIError, install_error_handlers, internal_error
from deployments.openai_format import ResponseBuilder, sse
from deployments.openai_schemas import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from deployments.protocol import ErrorInfo, GenerateChunk, GenerateRequest, TokenizeJob
from deployments.router_metrics import MetricsMiddleware, RouterMetrics

_PING_TIMEOUT_S = 5.0

log = logging.getLogger("ray.serve")


# NOTE: module helpers come before the deployment classes: `@serve.deployment` pickles the class
# when it is decorated, and globals defined after that point would be missing in the replica.

def _router() -> "Router | None":
    """This process's Router (None before it is constructed). The guards get their settings here:
    Serve serves a frozen copy of `app`, which the constructor cannot configure."""
    try:
        return serve.get_replica_context().servable_object  # type: ignore[return-value]
    except Exception:  # noqa: BLE001 - no replica context yet
        return None


def _guard() -> ApiKeyGuard | None:
    router = _router()
    return None if router is None else router.guard


def _body_limit() -> int | None:
    router = _router()
    return None if router is None else router.settings.max_body_bytes


def _metrics() -> RouterMetrics | None:
    router = _router()
    return None if router is None else router.metrics


app = FastAPI(title="mixtral-serve", docs_url=None, redoc_url=None)
install_error_handlers(app)
app.add_middleware(ApiKeyMiddleware, guard=_guard)
app.add_middleware(BodyLimitMiddleware, limit=_body_limit)
app.add_middleware(MetricsMiddleware, metrics=_metrics)  # added last = runs first: sees every answer


def _timed_out(seconds: float) -> OpenAIError:
    return OpenAIError(408, f"The request exceeded its time limit of {seconds:g} s.", code="request_timeout")


def _unavailable() -> OpenAIError:
    return OpenAIError(503, "The model replica became unavailable; retry the request.",
                       code="replica_unavailable")


# A replica that died (killed, out of memory, node lost) under a request in flight.
_REPLICA_GONE = (RayActorError, ActorUnavailableError)


class _Stream(StreamingResponse):
    """A StreamingResponse that always runs `on_close` when the response ends, however it ends
    (a client that left before the first byte never starts the body generator, so a `finally`
    inside it would not run)."""

    def __init__(self, body: AsyncIterator[str], on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(body, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()

async def _merge(streams: list[DeploymentResponseGenerator]) -> AsyncIterator[tuple[int, Any]]:
    """(prompt index, item) from every stream as items arrive."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: DeploymentResponseGenerator) -> None:
        try:
            async for item in stream:
                await queue.put((index, item))
        except Exception as err:  # noqa: BLE001 - re-raised by the consumer
            await queue.put((index, err))
        await queue.put((index, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


def _cancel(streams: list[DeploymentResponseGenerator]) -> None:
    """Stops replica work nobody will read (a no-op for streams already finished)."""
    for stream in streams:
        stream.cancel()


@dataclass
class RouterSettings:
    served_model_name: str
    default_tier: str
    max_model_len: dict[str, int]  # per tier
    auth: AuthConfig
    admission: dict[str, AdmissionConfig]  # per tier
    max_body_bytes: int


@serve.deployment
@serve.ingress(app)
class Router:
    def __init__(self, tiers: dict[str, DeploymentHandle], settings: RouterSettings) -> None:
        self.tiers = tiers
        self.settings = settings
        self.created = int(time.time())
        self.guard = ApiKeyGuard(settings.auth.entries(), settings.default_tier)
        self.gates = {name: TierGate(name, settings.admission[name]) for name in tiers}
        self.metrics = RouterMetrics(tiers, settings.default_tier)

    # ---- routing helpers ------------------------------------------------------------------
    def _tier(self, tier: str | None) -> str:
        name = tier or self.settings.default_tier
        if name not in self.tiers:
            raise OpenAIError(404, f"unknown tier {name!r}; tiers: {sorted(self.tiers)}", code="tier_not_found")
        return name

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.settings.served_model_name:
            raise OpenAIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")

    # ---- endpoints ------------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> JSONResponse:
        names = sorted(self.tiers)
        results = await asyncio.gather(
            *(asyncio.wait_for(self.tiers[n].ping.remote(), _PING_TIMEOUT_S) for n in names),
            return_exceptions=True,
        )
        tiers = {n: "ok" if r == "ok" else f"error: {type(r).__name__}" for n, r in zip(names, results)}
        healthy = all(v == "ok" for v in tiers.values())
        return JSONResponse({"status": "ok" if healthy else "unhealthy", "tiers": tiers},
                            status_code=200 if healthy else 503)

    @app.get("/v1/models")
    @app.get("/{tier}/v1/models")
    async def models(self, tier: str | None = None) -> JSONResponse:
        name = self._tier(tier)
        card = {
            "id": self.settings.served_model_name, "object": "model", "created": self.created,
            "owned_by": "mixtral-serve", "root": self.settings.served_model_name,
            "max_model_len": self.settings.max_model_len[name],
        }
        return JSONResponse({"object": "list", "data": [card]}, headers={"x-tier": name})

    @app.get("/{tier}/stats")
    async def stats(self, tier: str) -> JSONResponse:
        name = self._tier(tier)
        return JSONResponse(await self.tiers[name].describe.remote(), headers={"x-tier": name})

    @app.post("/tokenize")
    @app.post("/{tier}/tokenize")
    async def tokenize(self, body: TokenizeRequest, tier: str | None = None) -> JSONResponse:
        name = self._tier(tier)
        self._check_model(body.model)
        job = TokenizeJob(body.prompt, body.engine_messages(), body.engine_tools(), body.add_special_tokens,
                          body.add_generation_prompt, body.return_token_strs)
        result = await self._ask(name, self.tiers[name].tokenize.remote(job))
        return JSONResponse({"count": len(result.tokens), "max_model_len": self.settings.max_model_len[name],
                             "tokens": result.tokens, "token_strs": result.token_strs}, headers={"x-tier": name})

    @app.post("/detokenize")
    @app.post("/{tier}/detokenize")
    async def detokenize(self, body: DetokenizeRequest, tier: str | None = None) -> JSONResponse:
        name = self._tier(tier)
        self._check_model(body.model)
        text = await self._ask(name, self.tiers[name].detokenize.remote(body.tokens))
        return JSONResponse({"prompt": text}, headers={"x-tier": name})

    async def _ask(self, tier: str, call: Any) -> Any:
        """A replica's answer to a one-shot call, its ErrorInfo raised as the HTTP error."""
        try:
            result = await asyncio.wait_for(call, self.settings.admission[tier].request_timeout_s)
        except asyncio.TimeoutError:
            raise _timed_out(self.settings.admission[tier].request_timeout_s) from None
        except _REPLICA_GONE:
            raise _unavailable() from None
        if isinstance(result, ErrorInfo):
            raise OpenAIError.from_info(result)
        return result

    @app.post("/v1/completions")
    @app.post("/{tier}/v1/completions")
    async def completions(self, body: CompletionRequest, tier: str | None = None) -> Any:
        name = self._tier(tier)
        self._check_model(body.model)
        sampling = body.sampling()
        prompts = body.prompts()
        response_id = f"cmpl-{uuid.uuid4().hex}"
        requests = [GenerateRequest(f"{response_id}-{i}", sampling, prompt=p, stream=body.stream,
                                    priority=body.priority) for i, p in enumerate(prompts)]
        builder = ResponseBuilder("completion", response_id, self.settings.served_model_name, body.n,
                                  len(prompts), body.logprobs is not None, body.include_usage)
        return await self._respond(name, self.gates[name].admit(), requests, builder, body.stream)

    @app.post("/v1/chat/completions")
    @app.post("/{tier}/v1/chat/completions")
    async def chat(self, body: ChatCompletionRequest, tier: str | None = None) -> Any:
        name = self._tier(tier)
        self._check_model(body.model)
        sampling = body.sampling()
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        requests = [GenerateRequest(response_id, sampling, messages=body.engine_messages(), stream=body.stream,
                                    priority=body.priority, tools=body.tool_use())]
        builder = ResponseBuilder("chat", response_id, self.settings.served_model_name, body.n, 1,
                                  body.logprobs, body.include_usage)
        return await self._respond(name, self.gates[name].admit(), requests, builder, body.stream)

    # ---- generation -----------------------------------------------------------------------
    async def _respond(self, tier: str, slot: Slot, requests: list[GenerateRequest], builder: ResponseBuilder,
                       stream: bool) -> JSONResponse | StreamingResponse:
        """Runs admitted requests; the slot is released when the response is over, however it ends."""
        limit = self.settings.admission[tier].request_timeout_s
        deadline = asyncio.get_running_loop().time() + limit
        handle = self.tiers[tier].options(stream=True)
        streams: list[DeploymentResponseGenerator] = []

        def close() -> None:
            _cancel(streams)
            slot.release()

        async def first_chunks() -> list[GenerateChunk]:
            # The first chunk of each prompt arrives after its first step: errors found before
            # any work (bad parameters, too long) still get a proper status code, and the
            # replica's queue time is known for the headers.
            firsts = [await anext(s) for s in streams]
            for first in firsts:
                if isinstance(first, ErrorInfo):
                    raise OpenAIError.from_info(first)
            return firsts

        try:
            streams.extend(handle.generate.remote(r) for r in requests)
            firsts = await asyncio.wait_for(first_chunks(), limit)
            queue = [f.queue_seconds for f in firsts if f.queue_seconds is not None]
            headers = {"x-tier": tier, "x-queue-ms": f"{max(queue, default=0.0) * 1000:.2f}"}
            if stream:
                return _Stream(self._sse(builder, firsts, streams, deadline, limit), close,
                               media_type="text/event-stream", headers=headers)
            left = deadline - asyncio.get_running_loop().time()
            await asyncio.wait_for(self._collect(builder, firsts, streams), left)
        except asyncio.TimeoutError:
            close()
            raise _timed_out(limit) from None
        except _REPLICA_GONE:
            close()
            raise _unavailable() from None
        except BaseException:
            close()
            raise
        close()
        return JSONResponse(builder.response(), headers=headers)

    @staticmethod
    async def _collect(builder: ResponseBuilder, firsts: list[GenerateChunk],
                       streams: list[DeploymentResponseGenerator]) -> None:
        for index, (first, rest) in enumerate(zip(firsts, streams)):
            builder.add(index, first)
            async for chunk in rest:
                if isinstance(chunk, ErrorInfo):
                    raise OpenAIError.from_info(chunk)
                builder.add(index, chunk)

    async def _sse(self, builder: ResponseBuilder, firsts: list[GenerateChunk],
                   streams: list[DeploymentResponseGenerator], deadline: float, limit: float) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        merged = _merge(streams)
        try:
            for index, first in enumerate(firsts):
                if (payload := builder.stream_chunk(index, first)) is not None:
                    yield sse(payload)
            while True:
                try:
                    index, chunk = await asyncio.wait_for(anext(merged), deadline - loop.time())
                except StopAsyncIteration:
                    if builder.include_usage:
                        yield sse(builder.usage_chunk())
                    break
                if isinstance(chunk, ErrorInfo):
                    yield sse(OpenAIError.from_info(chunk).body())
                    break
                if (payload := builder.stream_chunk(index, chunk)) is not None:
                    yield sse(payload)
        # NOTE: headers are sent: every failure is reported in-band, then [DONE].
        except asyncio.TimeoutError:
            yield sse(_timed_out(limit).body())
        except _REPLICA_GONE:
            yield sse(_unavailable().body())
        except Exception:  # noqa: BLE001 - a bug: logged, scrubbed for the client
            log.exception("stream failed")
            yield sse(internal_error().body())
        finally:
            await merged.aclose()
            _cancel(streams)
        yield sse("[DONE]")
