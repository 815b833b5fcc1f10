"""Load for `bench serve`: the prompts, one timed streaming request, and closed- or open-loop
drivers that keep the server busy at a given load level.

Any OpenAI-compatible server works: requests go to `{base_url}/completions` or
`{base_url}/chat/completions`, streaming, with `stream_options.include_usage` so token counts come
from the server.

NOTE: the client is plain HTTP (aiohttp) and reads the server-sent events itself, as vLLM's
benchmark does, not the `openai` SDK: on the box it measures it takes its CPU from the server under
test, and the SDK spent ~4-6 ms of CPU per streamed request (request objects, retries, a typed model
per chunk) against ~1.2 ms here (2 cores, the tiny checkpoint through Serve, 40 requests each).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
import numpy as np
from tqdm import tqdm

from benchmarks.serve_report import LoadLevel, RequestResult, Status

Endpoint = Literal["completions", "chat"]
REJECT_STATUS = (429, 503)  # the server shed load (TGI, Ray Serve's max_queued_requests)

# Common English words that are each one token after a space in the Llama/Mistral
# SentencePiece vocabularies (checked with Mistral's tokenizer) and in BPE vocabularies,
# so n random words + BOS make an n + 1 token prompt without the server's tokenizer.
WORDS = tuple("""
time year people way day man thing woman life child world school state family student group
country problem hand part place case week company system program question work government
number night point home water room mother area money story fact month lot right study book
eye job word business issue side kind head house service friend father power hour game line
end member law car city community name president team minute idea body information back
parent face others level office door health person art war history party result change
morning reason research girl guy moment air teacher force education foot boy age policy
process music market sense nation plan college interest death experience effect use class
control care field development role effort rate heart drug show leader light voice wife
police mind price report decision son view relationship town road arm difference value
building action model season society tax director position player record paper space ground
form event official matter center couple site project activity star table need court oil
situation cost industry figure street image phase test period size sound red green blue
black white small large long little big high old great good early young important public
bad same able last late hard major better best free sure real full special easy clear
recent certain open whole close short simple past general true low strong fine poor deep
warm cold river stone tree bird fish garden window chair mountain ocean island forest
flower summer winter spring autumn travel quick slow bright dark sweet quiet happy
""".split())


@dataclass(frozen=True)
class RequestSpec:
    prompt: str
    max_tokens: int
    approx_input_tokens: int | None  # None for dataset prompts (unknown without the tokenizer)
    messages: list[dict[str, str]] | None = None  # a conversation so far: sent as chat, `prompt` unused


@dataclass
class Workload:
    """Request `i` is the same for a given seed, whatever the load or the order requests run in."""

    input_len: int = 128
    output_len: int = 128
    input_len_range: tuple[int, int] | None = None
    output_len_range: tuple[int, int] | None = None
    dataset: Path | None = None
    seed: int = 0
    _rows: list[tuple[str, int | None]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.dataset is not None:
            self._rows = load_dataset(self.dataset)

    def request(self, index: int, warmup: bool = False) -> RequestSpec:
        rng = np.random.default_rng([self.seed, int(warmup), index])
        lo, hi = self.output_len_range or (self.output_len, self.output_len)
        max_tokens = int(rng.integers(lo, hi + 1))
        if self._rows:
            prompt, row_max = self._rows[index % len(self._rows)]
            return RequestSpec(prompt, row_max or max_tokens, None)
        lo, hi = self.input_len_range or (self.input_len, self.input_len)
        n = int(rng.integers(lo, hi + 1))
        words = rng.choice(len(WORDS), size=max(n - 1, 1))  # the server adds BOS
        return RequestSpec(" ".join(WORDS[w] for w in words), max_tokens, n)


def load_dataset(path: Path) -> list[tuple[str, int | None]]:
    """JSONL rows {"prompt": str, "max_tokens": int (optional)}."""
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"{path}:{n}: expected an object with a string 'prompt'")
        max_tokens = row.get("max_tokens")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise ValueError(f"{path}:{n}: 'max_tokens' must be a positive integer")
        rows.append((row["prompt"], max_tokens))
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


def poisson_arrivals(rate: float, seed: int) -> Iterator[float]:
    """Send times (s from the start) of a Poisson process: the first at once, then exponential
    gaps of mean 1/rate drawn from `seed` (an infinite rate sends everything at once)."""
    rng = np.random.default_rng(seed)
    t = 0.0
    while True:
        yield t
        if not math.isinf(rate):
            t += float(rng.exponential(1.0 / rate))


class HTTPStatusError(Exception):
    """The server answered with an error status; `message` is its OpenAI-style error's."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class StreamError(Exception):
    """An error event inside a stream that had started (`data: {"error": ...}`)."""


def _error_text(error: Any) -> str:
    """The message of an OpenAI-style error object (`{"message": ...}`), else the object as text."""
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"][:200]
    return str(error)[:200]


async def _error_message(reply: aiohttp.ClientResponse) -> str:
    text = await reply.text()
    try:
        body = json.loads(text)
    except ValueError:
        return text[:200] or reply.reason or ""
    return _error_text(body.get("error", body) if isinstance(body, dict) else body)


def client_session(api_key: str | None, timeout_s: float) -> aiohttp.ClientSession:
    """One session for a benchmark's requests: no cap on connections (aiohttp's default of 100
    would queue a level of more streams in the client), the API key where one is given, and
    `timeout_s` for each request whole (aiohttp's own default would end a stream at 5 minutes)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), headers=headers,
                                 timeout=aiohttp.ClientTimeout(total=timeout_s))


@dataclass
class Sender:
    """Sends one streaming request and times every chunk that carries text."""

    session: aiohttp.ClientSession
    base_url: str  # ending in /v1
    model: str
    endpoint: Endpoint = "completions"
    ignore_eos: bool = True
    temperature: float = 0.0
    timeout_s: float = 300.0

    async def __call__(self, spec: RequestSpec, index: int, t0: float, scheduled_s: float | None = None,
                       reply: list[str] | None = None) -> RequestResult:
        """`reply`: where the generated text goes, piece by piece (a conversation's next turn sends it)."""
        start = time.perf_counter()
        times: list[float] = []  # filled as chunks arrive, so a timeout keeps what came
        usage: dict[str, int] = {}
        status: Status = "ok"
        error: str | None = None
        try:
            await asyncio.wait_for(self._stream(spec, start, times, usage, reply), self.timeout_s)
        except HTTPStatusError as err:
            status = "rejected" if err.status in REJECT_STATUS else "failed"
            error = str(err)
        except asyncio.TimeoutError:
            status, error = "failed", f"timeout after {self.timeout_s:g}s"
        except aiohttp.ClientConnectionError as err:
            status, error = "failed", f"connection error: {err}"[:200]
        except Exception as err:  # noqa: BLE001 - a benchmark records a broken request, it does not stop
            status, error = "failed", f"{type(err).__name__}: {err}"[:200]
        end = time.perf_counter()
        ok = status == "ok"
        return RequestResult(
            index=index, scheduled_s=scheduled_s, start_s=start - t0, status=status, error=error,
            input_tokens=usage.get("prompt_tokens", spec.approx_input_tokens), cached_tokens=usage.get("cached_tokens"),
            output_tokens=usage.get("completion_tokens", len(times)) if ok else 0,
            ttft_ms=times[0] * 1000 if ok and times else None,
            e2e_ms=(end - start) * 1000,
            itl_ms=(np.diff(times) * 1000).tolist() if ok else [],
        )

    async def _stream(self, spec: RequestSpec, start: float, times: list[float], usage: dict[str, int],
                      reply: list[str] | None) -> None:
        body: dict[str, Any] = {
            "model": self.model, "max_tokens": spec.max_tokens, "temperature": self.temperature, "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.ignore_eos:
            body["ignore_eos"] = True  # vLLM's (and ours) extension: exact lengths
        if spec.messages is not None or self.endpoint == "chat":
            body["messages"] = spec.messages or [{"role": "user", "content": spec.prompt}]
            url = f"{self.base_url}/chat/completions"
        else:
            body["prompt"] = spec.prompt
            url = f"{self.base_url}/completions"
        any_choice: list[float] = []
        async with self.session.post(url, json=body) as response:
            if response.status >= 400:
                raise HTTPStatusError(response.status, await _error_message(response))
            # NOTE: read to the body's end, past `[DONE]`: a response left with bytes unread closes
            # its connection, and the user's next request would open a new one (a proxy may send
            # the body's end in a later packet than `[DONE]`).
            async for line in response.content:  # server-sent events, one `data:` line each
                if not line.startswith(b"data:") or (data := line[5:].strip()) == b"[DONE]":
                    continue
                now = time.perf_counter() - start
                chunk = json.loads(data)
                if "error" in chunk:
                    raise StreamError(_error_text(chunk["error"]))
                if counts := chunk.get("usage"):
                    usage.update(prompt_tokens=counts["prompt_tokens"], completion_tokens=counts["completion_tokens"])
                    cached = (counts.get("prompt_tokens_details") or {}).get("cached_tokens")
                    if cached is not None:
                        usage["cached_tokens"] = cached
                choices = chunk.get("choices")
                if not choices:
                    continue
                any_choice.append(now)
                # A chat role header or a bare finish chunk carries no token: not timed.
                if texts := [t for c in choices if (t := _text(c))]:
                    times.append(now)
                    if reply is not None:
                        reply.extend(texts)
        if not times:  # nothing but empty chunks: time those rather than report no TTFT
            times.extend(any_choice)


def _text(choice: dict[str, Any]) -> str | None:
    delta = choice.get("delta")
    return delta.get("content") if delta is not None else choice.get("text")


@dataclass
class LoadRun:
    records: list[RequestResult]
    duration_s: float
    warmup_failed: int


async def run_load(send: Sender, workload: Workload, level: LoadLevel, *, num_requests: int | None,
                   duration_s: float | None, warmup: int, seed: int, progress: str | None) -> LoadRun:
    """Warm-up requests first (not measured), then the load level until `num_requests` were
    sent or `duration_s` passed; requests already in flight then finish (bounded by the timeout)."""
    if warmup:
        cap = int(level.value) if level.kind == "concurrency" else level.max_concurrency or warmup
        warm_slots = asyncio.Semaphore(min(warmup, cap))

        async def one_warmup(i: int) -> RequestResult:
            async with warm_slots:
                return await send(workload.request(i, warmup=True), i, time.perf_counter())

        warm = await asyncio.gather(*(one_warmup(i) for i in range(warmup)))
    else:
        warm = []
    bar = tqdm(total=num_requests, desc=progress, unit="req", leave=False, disable=progress is None)
    t0 = time.perf_counter()
    deadline = t0 + duration_s if duration_s is not None else math.inf
    records: list[RequestResult] = []
    try:
        if level.kind == "concurrency":
            indices = itertools.count()

            async def worker() -> None:
                for i in indices:  # shared: each worker takes the next request
                    if num_requests is not None and i >= num_requests:
                        return
                    spec = workload.request(i)  # built first: the deadline check is the last step before sending
                    if time.perf_counter() >= deadline:
                        return
                    records.append(await send(spec, i, t0))
                    bar.update()

            await asyncio.gather(*(worker() for _ in range(int(level.value))))
        else:
            sem = asyncio.Semaphore(level.max_concurrency) if level.max_concurrency else None

            async def arrive(i: int, at: float) -> None:
                if sem is None:
                    records.append(await send(workload.request(i), i, t0, at))
                else:
                    async with sem:
                        records.append(await send(workload.request(i), i, t0, at))
                bar.update()

            tasks = []
            for i, at in enumerate(poisson_arrivals(level.value, seed)):
                if (num_requests is not None and i >= num_requests) or t0 + at >= deadline:
                    break
                await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
                tasks.append(asyncio.create_task(arrive(i, at)))
            await asyncio.gather(*tasks)
    finally:
        bar.close()
    records.sort(key=lambda r: r.index)
    return LoadRun(records, time.perf_counter() - t0, sum(r.status != "ok" for r in warm))


@dataclass(frozen=True)
class Conversations:
    """`count` users, each holding a conversation of `turns` turns: every turn sends the whole
    history (a shared system prompt of `system_len` words, the earlier questions and the server's
    own answers) plus a new question drawn as `Workload.request` draws prompts."""

    count: int
    turns: int
    system_len: int = 0
    think_s: float = 0.0  # a user's pause between an answer and the next question (exponential, this mean)


async def run_conversations(send: Sender, workload: Workload, conversations: Conversations, *,
                            progress: str | None) -> LoadRun:
    """Each user runs its turns one after another; the users run at once (a closed loop of `count`)."""
    rng = np.random.default_rng([workload.seed, 7])
    system = " ".join(WORDS[w] for w in rng.choice(len(WORDS), size=conversations.system_len))
    bar = tqdm(total=conversations.count * conversations.turns, desc=progress, unit="req", leave=False,
               disable=progress is None)
    records: list[RequestResult] = []
    t0 = time.perf_counter()

    async def user(c: int) -> None:
        think = np.random.default_rng([workload.seed, 8, c])
        history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        for turn in range(conversations.turns):
            index = c * conversations.turns + turn
            question = workload.request(index)
            history.append({"role": "user", "content": question.prompt})
            reply: list[str] = []
            result = await send(RequestSpec(question.prompt, question.max_tokens, None, list(history)), index, t0,
                                reply=reply)
            records.append(result)
            bar.update()
            if result.status != "ok":
                return  # a conversation whose turn failed ends there
            history.append({"role": "assistant", "content": "".join(reply)})
            if conversations.think_s:
                await asyncio.sleep(float(think.exponential(conversations.think_s)))

    try:
        await asyncio.gather(*(user(c) for c in range(conversations.count)))
    finally:
        bar.close()
    records.sort(key=lambda r: r.index)
    return LoadRun(records, time.perf_counter() - t0, 0)


async def list_model(session: aiohttp.ClientSession, base_url: str) -> tuple[str, int | None]:
    """The first model the server lists, and its context length where the card gives one
    (vLLM and mixtral-serve report `max_model_len`)."""
    async with session.get(f"{base_url}/models") as response:
        if response.status >= 400:
            raise HTTPStatusError(response.status, await _error_message(response))
        cards = (await response.json()).get("data") or []
    if not cards:
        raise ValueError(f"{base_url}/models lists no model")
    max_len = cards[0].get("max_model_len")
    return cards[0]["id"], int(max_len) if isinstance(max_len, int) else None
