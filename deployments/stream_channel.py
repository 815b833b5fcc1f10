"""The streamed chunks' path from model replicas to a router: one TCP connection per (replica
process, router process), one frame per event-loop turn carrying every chunk the replica produced
in that turn, whatever the number of streams.

    router:  ChannelServer  listens on its node's address; `Relay` reads one response's chunks
    replica: ChannelClient  a connection per router address; `send` queues, the turn's end writes

NOTE: why not Serve's streaming handle calls for the chunks: each item of a Ray streaming
generator is an object reported over gRPC to the caller, then handed from Ray's threads to the
caller's event loop through a thread pool: ~0.25 ms of the caller's CPU and ~0.13 ms of the
replica's per item in a bare two-deployment app on 2 cores, more when the cores are busy. With
the engine's report per step, a replica's streams all produce their chunks in the same event-loop
turn: here that is one write and one read for all of them.
The control path stays on Serve: one unary handle call per prompt, so routing, max_ongoing_requests,
autoscaling, model multiplexing and cancellation (cancelling the call aborts the request) work as
before. The call returns the prompt's last chunk and how many went over the channel, so the router
knows when it has them all, whichever path delivers first.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import secrets
import struct
from collections import deque
from typing import Any

from deployments.protocol import ChannelAddress, Reply

log = logging.getLogger("ray.serve")

_HEADER = struct.Struct("!I")  # a frame's length
_TOKEN_BYTES = 16
# How long a router waits, after a prompt's call returned, for chunks the replica had already written:
# they are in flight on one connection, so only a connection lost in between leaves them missing.
_STRAGGLER_TIMEOUT_S = 10.0
Frame = list[tuple[str, Any]]  # (request id, chunk)


class ChannelLostError(ConnectionError):
    """Chunks a replica sent never arrived: the connection between it and the router broke."""


# ---- router side ---------------------------------------------------------------------------------
class _Reader(asyncio.Protocol):
    """One replica's connection: checks the token, then hands each whole frame to the server."""

    def __init__(self, server: ChannelServer) -> None:
        self._server = server
        self._buffer = bytearray()
        self._trusted = False
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment] - uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if not self._trusted:
            if len(self._buffer) < _TOKEN_BYTES:
                return
            if not secrets.compare_digest(bytes(self._buffer[:_TOKEN_BYTES]), self._server.address.token):
                log.warning("stream channel: dropped a connection without the router's token")
                assert self._transport is not None
                self._transport.close()
                return
            self._trusted = True
            del self._buffer[:_TOKEN_BYTES]
        start = 0
        while len(self._buffer) - start >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._buffer, start)
            end = start + _HEADER.size + size
            if len(self._buffer) < end:
                break
            self._server.deliver(pickle.loads(memoryview(self._buffer)[start + _HEADER.size:end]))
            start = end
        del self._buffer[:start]


class ChannelServer:
    """A router's listener: routes each arriving chunk to the `Relay` that registered its request id."""

    def __init__(self) -> None:
        self._relays: dict[str, tuple[Relay, int]] = {}  # request id -> (relay, prompt index)
        self._address: ChannelAddress | None = None
        self._starting: asyncio.Lock | None = None

    @property
    def address(self) -> ChannelAddress:
        assert self._address is not None, "the channel is not listening yet"
        return self._address

    async def start(self, host: str) -> ChannelAddress:
        """Listens on `host` (an ephemeral port), once; returns where replicas send."""
        if self._address is None:
            self._starting = self._starting or asyncio.Lock()
            async with self._starting:
                if self._address is None:
                    server = await asyncio.get_running_loop().create_server(lambda: _Reader(self), host, 0)
                    port = server.sockets[0].getsockname()[1]
                    self._address = ChannelAddress(host, port, secrets.token_bytes(_TOKEN_BYTES))
        return self._address

    def register(self, request_id: str, relay: Relay, index: int) -> None:
        self._relays[request_id] = (relay, index)

    def unregister(self, request_id: str) -> None:
        self._relays.pop(request_id, None)

    def deliver(self, frame: Frame) -> None:
        for request_id, chunk in frame:
            if (target := self._relays.get(request_id)) is not None:  # else: the response already ended
                relay, index = target
                relay.put(index, chunk)


class Relay:
    """One response's chunks, every prompt's in order: those of the channel, then each call's last.

    `next()` gives (prompt index, chunk) as they arrive and raises StopAsyncIteration when every
    prompt ended; a call that failed (its replica died, say) raises its error there. `ready()` gives
    what has arrived without waiting, for a reader that lagged to take its backlog at once.
    """

    def __init__(self, server: ChannelServer, request_ids: list[str], calls: list[Any]) -> None:
        """`calls`: each prompt's `DeploymentResponse`, whose result is its `Reply`."""
        self._server = server
        self._ids = request_ids
        self._items: deque[tuple[int, Any, bool]] = deque()  # (index, item, is the reply), as they arrived
        self._arrived = asyncio.Event()
        self._received = [0] * len(request_ids)
        self._waiting: dict[int, Reply] = {}  # replies that overtook some of their prompt's chunks
        self._open = len(request_ids)
        self._failure: BaseException | None = None  # a call's error, raised once the chunks before it are read
        self.replay: deque[tuple[int, Any]] = deque()  # read ahead by the caller, to be read again
        for index, request_id in enumerate(request_ids):
            server.register(request_id, self, index)
        self._calls = calls
        self._tasks = [asyncio.ensure_future(self._await(index, call)) for index, call in enumerate(calls)]

    def _arrive(self, index: int, item: Any, is_reply: bool) -> None:
        self._items.append((index, item, is_reply))
        self._arrived.set()

    def put(self, index: int, chunk: Any) -> None:
        self._arrive(index, chunk, False)

    async def _await(self, index: int, call: Any) -> None:
        try:
            reply = await call
        except BaseException as err:  # noqa: BLE001 - raised to the reader by next()
            self._arrive(index, err, True)
            if isinstance(err, asyncio.CancelledError):
                raise
            return
        self._arrive(index, reply, True)

    def _take(self) -> tuple[int, Any] | None:
        """The next chunk that can be read now; None when there is none yet, or no more, or a failure."""
        if self.replay:
            return self.replay.popleft()
        while self._open and self._failure is None and self._items:
            index, item, is_reply = self._items.popleft()
            if not is_reply:
                self._received[index] += 1
                if (reply := self._waiting.get(index)) is not None and self._received[index] == reply.sent:
                    del self._waiting[index]
                    self.replay.append(self._last(index, reply))
                return index, item
            if isinstance(item, BaseException):
                self._failure = item
                return None
            assert isinstance(item, Reply)
            if self._received[index] < item.sent:
                self._waiting[index] = item
                continue
            return self._last(index, item)
        return None

    async def next(self) -> tuple[int, Any]:
        while (item := self._take()) is None:
            if self._failure is not None:
                raise self._failure
            if not self._open:
                raise StopAsyncIteration
            self._arrived.clear()
            if self._waiting:  # a reply arrived before all its chunks: they are in flight, or lost
                try:
                    await asyncio.wait_for(self._arrived.wait(), _STRAGGLER_TIMEOUT_S)
                except asyncio.TimeoutError:
                    raise ChannelLostError("streamed chunks from the model replica were lost") from None
            else:
                await self._arrived.wait()
        return item

    def ready(self) -> list[tuple[int, Any]]:
        """Every chunk that can be read without waiting (the end and failures stay for `next()`)."""
        items = []
        while (item := self._take()) is not None:
            items.append(item)
        return items

    def _last(self, index: int, reply: Reply) -> tuple[int, Any]:
        self._open -= 1
        self._server.unregister(self._ids[index])
        return index, reply.last

    def close(self) -> None:
        """Ends the response: calls still running are cancelled (their replicas abort the requests)."""
        for request_id in self._ids:
            self._server.unregister(request_id)
        for call, task in zip(self._calls, self._tasks):
            if not task.done():
                call.cancel()
                task.cancel()


# ---- replica side --------------------------------------------------------------------------------
class _Writer(asyncio.Protocol):
    """A connection's flow control: paused while the router's socket buffers are full."""

    def __init__(self) -> None:
        self._resumed = asyncio.Event()
        self._resumed.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._resumed.set()  # later sends find the transport closing

    def pause_writing(self) -> None:
        self._resumed.clear()

    def resume_writing(self) -> None:
        self._resumed.set()

    async def writable(self) -> None:
        await self._resumed.wait()


class _Connection:
    def __init__(self, transport: asyncio.Transport, protocol: _Writer) -> None:
        self.transport = transport
        self.protocol = protocol
        self.pending: Frame = []


class ChannelClient:
    """A replica's connections to routers. `send` queues a chunk; everything queued in one event-loop
    turn leaves in one frame, at the turn's end."""

    def __init__(self) -> None:
        self._connections: dict[ChannelAddress, _Connection] = {}
        self._connecting: dict[ChannelAddress, asyncio.Future[_Connection]] = {}
        self.frames_sent = 0  # what tests count: frames, not chunks

    async def connect(self, address: ChannelAddress) -> None:
        """Opens the connection to `address` unless one is open (call before the first `send`)."""
        if (conn := self._connections.get(address)) is not None and not conn.transport.is_closing():
            return
        # Connections to routers that are gone (replaced, scaled down) are forgotten here.
        self._connections = {a: c for a, c in self._connections.items() if not c.transport.is_closing()}
        if (pending := self._connecting.get(address)) is not None:
            await asyncio.shield(pending)
            return
        loop = asyncio.get_running_loop()
        self._connecting[address] = future = loop.create_future()
        try:
            transport, protocol = await loop.create_connection(_Writer, address.host, address.port)
            transport.write(address.token)
            conn = _Connection(transport, protocol)  # type: ignore[arg-type] - uvloop's transports: see _Reader
            self._connections[address] = conn
            future.set_result(conn)
        except BaseException as err:
            if isinstance(err, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(err)
                future.exception()  # retrieved: waiters re-raise it
            raise
        finally:
            del self._connecting[address]

    def send(self, address: ChannelAddress, request_id: str, chunk: Any) -> None:
        conn = self._connections.get(address)
        if conn is None or conn.transport.is_closing():
            raise ChannelLostError(f"no open stream channel to the router at {address.host}:{address.port}")
        if not conn.pending:
            asyncio.get_running_loop().call_soon(self._flush, conn)
        conn.pending.append((request_id, chunk))

    async def writable(self, address: ChannelAddress) -> None:
        """Waits while the router reads slower than this replica writes (TCP flow control)."""
        if (conn := self._connections.get(address)) is not None:
            await conn.protocol.writable()

    def _flush(self, conn: _Connection) -> None:
        frame, conn.pending = conn.pending, []
        if conn.transport.is_closing():
            return  # the router is gone; its calls (and so these streams) are cancelled with it
        data = pickle.dumps(frame, protocol=pickle.HIGHEST_PROTOCOL)
        conn.transport.write(_HEADER.pack(len(data)) + data)
        self.frames_sent += 1

    def close(self) -> None:
        for conn in self._connections.values():
            conn.transport.close()
        self._connections.clear()
