"""The ingress: OpenAI's HTTP API per tier, routed to the tier's model replicas.

    GET  /health
    GET  /<tier>/v1/models            POST /<tier>/v1/completions   POST /<tier>/v1/chat/completions
    GET  /v1/models, POST /v1/...     (the configured default tier)
    GET  /<tier>/stats                (one replica's view: tuning, queue, latency fit)
    POST /<tier>/tokenize  /<tier>/detokenize  (and /tokenize, /detokenize: vLLM's bodies)
    POST /<tier>/v1/load_lora_adapter  /<tier>/v1/unload_lora_adapter  (and under /v1: vLLM's bodies)

`model` selects the served model or one of the tier's LoRA adapters (from the config, or loaded at
runtime: deployments/adapter_registry.py). A request with an adapter goes, through Serve's model
multiplexing, to a replica that already holds it where one can take it.

It validates requests (into the engine's `SamplingParams`, a torch-free type), fans batch prompts
out, streams SSE and formats responses; it holds no tensors and its process never loads torch. `x-request-id` (the
client's, else a fresh one) is set on every response by Serve (its proxy, or with the HAProxy
ingress the router replica's own HTTP server); handlers add `x-tier` and the replica's queue time
`x-queue-ms`.

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

import ray
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle, DeploymentResponse
from starlette.types import Receive, Scope, Send

from deployments.auth import ApiKeyGuard, ApiKeyMiddleware, AuthConfig
from deployments.backpressure import AdmissionConfig, Slot, TierGate
from deployments.body_limit import BodyLimitMiddleware
from deployments.errors import OpenAIError, install_error_handlers, internal_error
from deployments.openai_format import ResponseBuilder, sse
from deployments.openai_schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoRAAdapterRequest,
    TokenizeRequest,
    UnloadLoRAAdapterRequest,
)
from deployments.protocol import ErrorInfo, GenerateChunk, GenerateRequest, TokenizeJob
from deployments.router_metrics import MetricsMiddleware, RouterMetrics
from deployments.stream_channel import ChannelLostError, ChannelServer, Relay
from engine.lora_request import LoRARequest

_PING_TIMEOUT_S = 5.0
# How long a router trusts what it last read of the runtime-loaded adapters (load and unload calls
# through another router replica reach this one within it).
_ADAPTER_TTL_S = 1.0

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


# A replica that died (killed, out of memory, node lost) under a request in flight, or the
# connection its chunks came over.
_REPLICA_GONE = (RayActorError, ActorUnavailableError, ChannelLostError)


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


def _events(builder: ResponseBuilder, arrived: list[tuple[int, GenerateChunk | ErrorInfo]]) -> str:
    """The SSE events for chunks read together: one per prompt, its chunks merged, up to a failure.

    NOTE: a stream whose reader lagged (the router's loop or the proxy busy on two shared cores)
    finds several of its steps waiting. Sent as one event, they cost one message on each hop from
    here to the client instead of one each, so the lag shrinks instead of feeding itself; the
    client gets the same tokens at the same moment.
    """
    merged: dict[int, GenerateChunk] = {}
    for index, chunk in arrived:
        if isinstance(chunk, ErrorInfo):
            break
        if index in merged:
            merged[index].merge(chunk)
        else:
            merged[index] = chunk
    payloads = (builder.stream_chunk(index, chunk) for index, chunk in merged.items())
    return "".join(sse(payload) for payload in payloads if payload is not None)


async def stream_events(builder: ResponseBuilder, firsts: list[GenerateChunk], relay: Relay, deadline: float,
                        limit: float) -> AsyncIterator[str]:
    """A streamed response's body: SSE events from each prompt's first chunk to [DONE]."""
    loop = asyncio.get_running_loop()
    try:
        if events := _events(builder, list(enumerate(firsts))):
            yield events
        while True:
            try:
                arrived = [await asyncio.wait_for(relay.next(), deadline - loop.time())]
            except StopAsyncIteration:
                if builder.include_usage:
                    yield sse(builder.usage_chunk())
                break
            arrived += relay.ready()
            failure = next((c for _, c in arrived if isinstance(c, ErrorInfo)), None)
            events = _events(builder, arrived) + (sse(OpenAIError.from_info(failure).body()) if failure else "")
            if events:
                yield events
            if failure is not None:
                break
    # NOTE: headers are sent: every failure is reported in-band, then [DONE].
    except asyncio.TimeoutError:
        yield sse(_timed_out(limit).body())
    except _REPLICA_GONE:
        yield sse(_unavailable().body())
    except Exception:  # noqa: BLE001 - a bug: logged, scrubbed for the client
        log.exception("stream failed")
        yield sse(internal_error().body())
    finally:
        relay.close()
    yield sse("[DONE]")


@dataclass
class RouterSettings:
    served_model_name: str
    default_tier: str
    max_model_len: dict[str, int]  # per tier
    auth: AuthConfig
    admission: dict[str, AdmissionConfig]  # per tier
    max_body_bytes: int
    adapters: dict[str, dict[str, str]]  # per tier: LoRA adapter name -> folder, from the config
    runtime_loading: dict[str, bool]  # per tier: load_lora_adapter / unload_lora_adapter allowed


@serve.deployment
@serve.ingress(app)
class Router:
    def __init__(self, tiers: dict[str, DeploymentHandle], settings: RouterSettings,
                 registry: DeploymentHandle | None = None) -> None:
        self.tiers = tiers
        self.settings = settings
        self.registry = registry  # the runtime-loaded adapters, where some tier allows them
        self._runtime: dict[tuple[str, str], tuple[str | None, float]] = {}  # (tier, name) -> (folder, read at)
        self.created = int(time.time())
        self.guard = ApiKeyGuard(settings.auth.entries(), settings.default_tier)
        self.gates = {name: TierGate(name, settings.admission[name]) for name in tiers}
        self.metrics = RouterMetrics(tiers, settings.default_tier)
        # Streamed chunks arrive here, not through the handle calls (deployments/stream_channel.py). The
        # node's address, not loopback: replicas may run on other nodes.
        self.channel = ChannelServer()
        self._channel_host = ray.util.get_node_ip_address()

    # ---- routing helpers ------------------------------------------------------------------
    def _tier(self, tier: str | None) -> str:
        name = tier or self.settings.default_tier
        if name not in self.tiers:
            raise OpenAIError(404, f"unknown tier {name!r}; tiers: {sorted(self.tiers)}", code="tier_not_found")
        return name

    async def _adapter(self, tier: str, model: str | None) -> LoRARequest | None:
        """The adapter `model` names on this tier (None: the served model); 404 for anything else."""
        if model is None or model == self.settings.served_model_name:
            return None
        path = self.settings.adapters[tier].get(model)
        if path is None and self.registry is not None and self.settings.runtime_loading[tier]:
            path = await self._runtime_path(tier, model)
        if path is None:
            raise OpenAIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
        return LoRARequest(model, path)

    async def _runtime_path(self, tier: str, name: str) -> str | None:
        assert self.registry is not None
        now = time.monotonic()
        path, read_at = self._runtime.get((tier, name), (None, -_ADAPTER_TTL_S))
        if now - read_at >= _ADAPTER_TTL_S:
            path = await self.registry.lookup.remote(tier, name)
            self._runtime[(tier, name)] = (path, now)
        return path

    def _card(self, model_id: str, tier: str, **extra: Any) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": self.created, "owned_by": "mixtral-serve",
                "max_model_len": self.settings.max_model_len[tier], **extra}

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
        base = self.settings.served_model_name
        adapters = dict(self.settings.adapters[name])
        if self.registry is not None and self.settings.runtime_loading[name]:
            adapters |= await self.registry.listing.remote(name)
        # As vLLM lists them: an adapter's `root` is its folder, its `parent` the base model.
        cards = [self._card(base, name, root=base, parent=None)]
        cards += [self._card(adapter, name, root=path, parent=base) for adapter, path in sorted(adapters.items())]
        return JSONResponse({"object": "list", "data": cards}, headers={"x-tier": name})

    @app.post("/v1/load_lora_adapter")
    @app.post("/{tier}/v1/load_lora_adapter")
    async def load_lora_adapter(self, body: LoadLoRAAdapterRequest, tier: str | None = None) -> PlainTextResponse:
        """Serves a new adapter on the tier: checked by one replica, then known to every router and
        sent with each request that names it (replicas read it on first use)."""
        name = self._runtime_tier(tier)
        adapter = body.lora_name
        if adapter == self.settings.served_model_name or adapter in self.settings.adapters[name]:
            raise OpenAIError(400, f"The lora adapter '{adapter}' has already been loaded.", param="lora_name")
        await self._ask(name, self.tiers[name].check_adapter.remote(LoRARequest(adapter, body.lora_path)))
        assert self.registry is not None
        if not await self.registry.add.remote(name, adapter, body.lora_path):
            raise OpenAIError(400, f"The lora adapter '{adapter}' has already been loaded.", param="lora_name")
        self._runtime[(name, adapter)] = (body.lora_path, time.monotonic())
        log.info("tier %s: LoRA adapter %s loaded from %s", name, adapter, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{adapter}' added successfully.", headers={"x-tier": name})

    @app.post("/v1/unload_lora_adapter")
    @app.post("/{tier}/v1/unload_lora_adapter")
    async def unload_lora_adapter(self, body: UnloadLoRAAdapterRequest, tier: str | None = None) -> PlainTextResponse:
        """Stops serving a runtime-loaded adapter: new requests naming it get 404; requests already
        running with it finish; replicas let go of its weights as other adapters need the room."""
        name = self._runtime_tier(tier)
        adapter = body.lora_name
        if adapter in self.settings.adapters[name]:
            raise OpenAIError(400, f"The lora adapter '{adapter}' comes from the config file; remove it there.",
                              param="lora_name")
        assert self.registry is not None
        if not await self.registry.remove.remote(name, adapter):
            raise OpenAIError(404, f"The lora adapter '{adapter}' cannot be found.", param="lora_name",
                              code="model_not_found")
        self._runtime[(name, adapter)] = (None, time.monotonic())
        log.info("tier %s: LoRA adapter %s unloaded", name, adapter)
        return PlainTextResponse(f"Success: LoRA adapter '{adapter}' removed successfully.", headers={"x-tier": name})

    def _runtime_tier(self, tier: str | None) -> str:
        name = self._tier(tier)
        if not self.settings.runtime_loading[name]:
            raise OpenAIError(400, f"tier {name!r} does not load LoRA adapters at runtime: set lora.runtime_loading "
                                   "in the app's or the tier's config", code="runtime_loading_disabled")
        return name

    @app.get("/{tier}/stats")
    async def stats(self, tier: str) -> JSONResponse:
        name = self._tier(tier)
        return JSONResponse(await self.tiers[name].describe.remote(), headers={"x-tier": name})

    @app.post("/tokenize")
    @app.post("/{tier}/tokenize")
    async def tokenize(self, body: TokenizeRequest, tier: str | None = None) -> JSONResponse:
        name = self._tier(tier)
        await self._adapter(name, body.model)  # an adapter tokenizes as its base model does
        job = TokenizeJob(body.prompt, body.engine_messages(), body.engine_tools(), body.add_special_tokens,
                          body.add_generation_prompt, body.return_token_strs)
        result = await self._ask(name, self.tiers[name].tokenize.remote(job))
        return JSONResponse({"count": len(result.tokens), "max_model_len": self.settings.max_model_len[name],
                             "tokens": result.tokens, "token_strs": result.token_strs}, headers={"x-tier": name})

    @app.post("/detokenize")
    @app.post("/{tier}/detokenize")
    async def detokenize(self, body: DetokenizeRequest, tier: str | None = None) -> JSONResponse:
        name = self._tier(tier)
        await self._adapter(name, body.model)
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
        lora = await self._adapter(name, body.model)
        sampling = body.sampling()
        prompts = body.prompts()
        response_id = f"cmpl-{uuid.uuid4().hex}"
        requests = [GenerateRequest(f"{response_id}-{i}", sampling, prompt=p, priority=body.priority, lora=lora)
                    for i, p in enumerate(prompts)]
        builder = ResponseBuilder("completion", response_id, body.model or self.settings.served_model_name, body.n,
                                  len(prompts), body.logprobs is not None, body.include_usage)
        return await self._respond(name, self.gates[name].admit(), requests, builder, body.stream)

    @app.post("/v1/chat/completions")
    @app.post("/{tier}/v1/chat/completions")
    async def chat(self, body: ChatCompletionRequest, tier: str | None = None) -> Any:
        name = self._tier(tier)
        lora = await self._adapter(name, body.model)
        sampling = body.sampling()
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        requests = [GenerateRequest(response_id, sampling, messages=body.engine_messages(), priority=body.priority,
                                    tools=body.tool_use(), lora=lora)]
        builder = ResponseBuilder("chat", response_id, body.model or self.settings.served_model_name, body.n, 1,
                                  body.logprobs, body.include_usage)
        return await self._respond(name, self.gates[name].admit(), requests, builder, body.stream)

    # ---- generation -----------------------------------------------------------------------
    async def _respond(self, tier: str, slot: Slot, requests: list[GenerateRequest], builder: ResponseBuilder,
                       stream: bool) -> JSONResponse | StreamingResponse:
        """Runs admitted requests; the slot is released when the response is over, however it ends."""
        limit = self.settings.admission[tier].request_timeout_s
        deadline = asyncio.get_running_loop().time() + limit
        lora = requests[0].lora
        # Serve's model multiplexing: to a replica already holding the adapter where one can take the request.
        handle = self.tiers[tier].options(multiplexed_model_id=lora.name if lora else "")
        relay: Relay | None = None

        def close() -> None:
            if relay is not None:
                relay.close()  # stops replica work nobody will read
            slot.release()

        async def first_chunks(relay: Relay) -> list[GenerateChunk]:
            # The first chunk of each prompt arrives after its first step: errors found before
            # any work (bad parameters, too long) still get a proper status code, and the
            # replica's queue time is known for the headers.
            firsts: dict[int, GenerateChunk] = {}
            later: list[tuple[int, GenerateChunk]] = []  # of prompts that started earlier: read again
            while len(firsts) < len(requests):
                index, chunk = await relay.next()
                if isinstance(chunk, ErrorInfo):
                    raise OpenAIError.from_info(chunk)
                if index in firsts:
                    later.append((index, chunk))
                else:
                    firsts[index] = chunk
            relay.replay.extend(later)
            return [firsts[i] for i in range(len(requests))]

        try:
            if stream:
                address = await self.channel.start(self._channel_host)
                for request in requests:
                    request.reply_to = address
            calls: list[DeploymentResponse] = [handle.generate.remote(r) for r in requests]
            relay = Relay(self.channel, [r.request_id for r in requests], calls)
            firsts = await asyncio.wait_for(first_chunks(relay), limit)
            queue = [f.queue_seconds for f in firsts if f.queue_seconds is not None]
            headers = {"x-tier": tier, "x-queue-ms": f"{max(queue, default=0.0) * 1000:.2f}"}
            if stream:
                return _Stream(stream_events(builder, firsts, relay, deadline, limit), close,
                               media_type="text/event-stream", headers=headers)
            left = deadline - asyncio.get_running_loop().time()
            await asyncio.wait_for(self._collect(builder, firsts, relay), left)
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
    async def _collect(builder: ResponseBuilder, firsts: list[GenerateChunk], relay: Relay) -> None:
        for index, first in enumerate(firsts):
            builder.add(index, first)
        while True:
            try:
                index, chunk = await relay.next()
            except StopAsyncIteration:
                return
            if isinstance(chunk, ErrorInfo):
                raise OpenAIError.from_info(chunk)
            builder.add(index, chunk)
