"""The stream channel between model replicas and a router (deployments/stream_channel.py), over real
sockets on 127.0.0.1: frames per event-loop turn, order against the calls' replies, the token, losses,
and the router's events for a backlog."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from deployments import stream_channel
from deployments.openai_format import ResponseBuilder
from deployments.protocol import ChannelAddress, ChoiceChunk, ErrorInfo, GenerateChunk, Reply, TokenLogprob
from deployments.router import stream_events
from deployments.stream_channel import ChannelClient, ChannelLostError, ChannelServer, Relay


async def drain(relay: Relay) -> list[tuple[int, Any]]:
    items = []
    while True:
        try:
            items.append(await asyncio.wait_for(relay.next(), 5))
        except StopAsyncIteration:
            return items


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0.01)


def test_chunks_of_one_turn_travel_in_one_frame() -> None:
    """Sixteen streams' chunks made in the same turn (as one engine step makes them) cost one frame."""
    streams, steps = 16, 5

    async def main() -> tuple[list[list[tuple[int, Any]]], int]:
        server = ChannelServer()
        address = await server.start("127.0.0.1")
        client = ChannelClient()
        await client.connect(address)
        replies: list[asyncio.Future[Reply]] = [asyncio.get_running_loop().create_future() for _ in range(streams)]
        relays = [Relay(server, [f"r{i}"], [replies[i]]) for i in range(streams)]
        for step in range(steps):
            for i in range(streams):
                client.send(address, f"r{i}", f"r{i} step {step}")
            await settle()
        for i in range(streams):
            replies[i].set_result(Reply(f"r{i} last", steps))
        out = [await drain(relay) for relay in relays]
        client.close()
        return out, client.frames_sent

    out, frames = asyncio.run(main())
    for i, items in enumerate(out):
        assert items == [(0, f"r{i} step {s}") for s in range(steps)] + [(0, f"r{i} last")]
    assert frames == steps  # not streams x steps


def test_a_reply_that_overtakes_its_chunks_waits_for_them() -> None:
    """The call's result can arrive before chunks still on the socket: they come first, in order."""

    async def main() -> list[tuple[int, Any]]:
        server = ChannelServer()
        address = await server.start("127.0.0.1")
        reply: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        relay = Relay(server, ["a", "b"], [reply, asyncio.sleep(0.05, Reply("b last", 0))])
        reply.set_result(Reply("a last", 2))  # before any chunk of "a"
        first = await asyncio.wait_for(relay.next(), 5)  # "b" ends first: its call returns, no chunks
        client = ChannelClient()
        await client.connect(address)
        client.send(address, "a", "a0")
        client.send(address, "a", "a1")
        rest = await drain(relay)
        client.close()
        return [first, *rest]

    assert asyncio.run(main()) == [(1, "b last"), (0, "a0"), (0, "a1"), (0, "a last")]


def test_a_failed_call_and_lost_chunks_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream_channel, "_STRAGGLER_TIMEOUT_S", 0.2)

    async def failed_call() -> Reply:
        raise ConnectionResetError("replica died")

    async def main() -> None:
        server = ChannelServer()
        await server.start("127.0.0.1")
        relay = Relay(server, ["x"], [failed_call()])
        with pytest.raises(ConnectionResetError):
            await drain(relay)
        # The replica says it sent 3 chunks; none arrived (a connection lost in between).
        done: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        done.set_result(Reply(ErrorInfo(500, "late"), 3))
        relay = Relay(server, ["y"], [done])
        with pytest.raises(ChannelLostError):
            await drain(relay)

    asyncio.run(main())


def test_a_connection_without_the_token_is_dropped() -> None:
    async def main() -> list[tuple[int, Any]]:
        server = ChannelServer()
        address = await server.start("127.0.0.1")
        reply: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        relay = Relay(server, ["r"], [reply])
        forged = ChannelAddress(address.host, address.port, b"x" * len(address.token))
        client = ChannelClient()
        await client.connect(forged)
        client.send(forged, "r", "injected")
        await settle()
        with pytest.raises(ChannelLostError):
            client.send(forged, "r", "again")  # the router closed the connection
        reply.set_result(Reply("last", 0))
        return await drain(relay)

    assert asyncio.run(main()) == [(0, "last")]  # nothing of the forged connection


def test_closing_a_relay_cancels_the_calls_still_running() -> None:
    class Call:
        def __init__(self) -> None:
            self.future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
            self.cancelled = False

        def __await__(self) -> Any:
            return self.future.__await__()

        def cancel(self) -> None:
            self.cancelled = True

    async def main() -> tuple[bool, bool]:
        server = ChannelServer()
        await server.start("127.0.0.1")
        done, running = Call(), Call()
        done.future.set_result(Reply("last", 0))
        relay = Relay(server, ["done", "running"], [done, running])
        assert await asyncio.wait_for(relay.next(), 5) == (0, "last")
        relay.close()
        return done.cancelled, running.cancelled

    assert asyncio.run(main()) == (False, True)


def test_ready_gives_the_backlog_and_leaves_a_failure_to_next() -> None:
    async def main() -> tuple[list[tuple[int, Any]], list[tuple[int, Any]]]:
        server = ChannelServer()
        address = await server.start("127.0.0.1")
        call: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        relay = Relay(server, ["x"], [call])
        client = ChannelClient()
        await client.connect(address)
        for step in range(3):
            client.send(address, "x", f"x{step}")
            await settle()
        call.set_exception(ConnectionResetError("replica died"))
        await settle()
        backlog, after = relay.ready(), relay.ready()
        with pytest.raises(ConnectionResetError):
            await relay.next()
        client.close()
        return backlog, after

    backlog, after = asyncio.run(main())
    assert backlog == [(0, "x0"), (0, "x1"), (0, "x2")]
    assert after == []


def _chunk(token: str, finish: str | None = None) -> GenerateChunk:
    logprobs = [TokenLogprob(token, -1.0, [])] if token else []
    return GenerateChunk([ChoiceChunk(0, token, len(logprobs), logprobs, finish)], finish is not None,
                         num_prompt_tokens=4, num_output_tokens=1, num_cached_tokens=0, queue_seconds=None)


def test_a_lagging_streams_backlog_goes_out_as_one_event_per_prompt() -> None:
    """Steps that waited for the router (a busy event loop) leave in one SSE event per prompt, with
    every token and logprob in order; a failure in the backlog ends the stream after the tokens before it."""

    async def main() -> list[str]:
        server = ChannelServer()
        address = await server.start("127.0.0.1")
        calls: list[asyncio.Future[Reply]] = [asyncio.get_running_loop().create_future() for _ in range(2)]
        relay = Relay(server, ["a", "b"], calls)
        client = ChannelClient()
        await client.connect(address)
        for step in range(3):  # three engine steps, nobody reading
            client.send(address, "a", _chunk(f" a{step}"))
            client.send(address, "b", _chunk(f" b{step}", "length" if step == 2 else None))
            await settle()
        calls[1].set_result(Reply(_chunk("", "length"), 3))
        client.send(address, "a", ErrorInfo(500, "engine failed"))
        client.send(address, "a", _chunk(" never"))
        await settle()
        builder = ResponseBuilder("completion", "cmpl-1", "m", n=1, num_prompts=2, logprobs=True, include_usage=False)
        deadline = asyncio.get_running_loop().time() + 30
        events = [e async for e in stream_events(builder, [_chunk(" a"), _chunk(" b")], relay, deadline, 30)]
        client.close()
        return events

    firsts, backlog, done = asyncio.run(main())
    assert firsts.count("data: ") == 2
    payloads = [json.loads(line[6:]) for line in backlog.split("\n\n") if line]
    a, b, error = payloads
    assert a["choices"][0]["text"] == " a0 a1 a2" and a["choices"][0]["logprobs"]["tokens"] == [" a0", " a1", " a2"]
    assert b["choices"][0]["text"] == " b0 b1 b2" and b["choices"][0]["finish_reason"] == "length"
    assert b["choices"][0]["logprobs"]["text_offset"] == [2, 5, 8]  # after the first event's " b"
    assert error["error"]["message"] == "engine failed"
    assert done == "data: [DONE]\n\n"
