"""The front's end of the engine core process's socket, on the event loop: messages framed as
`multiprocessing.connection` frames them (a 4-byte big-endian length, then the pickle), which is
how the core process reads and writes its end (`Connection`).

NOTE: an asyncio transport, not `Connection.recv`/`send` on the front's side: an event loop
watching a socket may make it non-blocking (uvloop, Serve's loop, does), and then a report
larger than one read raised BlockingIOError mid-message, and a command sent while the core's
receive buffer was full (long prompts during a long step) failed. The transport buffers both
ways: a read takes what arrived, a send never blocks the loop. It reads on the loop itself, not on
a reader thread: one wake-up per report and no second thread contending for the GIL.
"""

from __future__ import annotations

import asyncio
import pickle
import socket
import struct
from collections.abc import Callable
from typing import Any, cast

_HEADER = struct.Struct("!i")  # Connection's length prefix for messages under 2 GiB


class CoreSocket(asyncio.Protocol):
    def __init__(self, on_message: Callable[[Any], None], on_lost: Callable[[Exception | None], None]) -> None:
        self._on_message, self._on_lost = on_message, on_lost
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._closing = False

    @classmethod
    async def open(cls, sock: socket.socket, on_message: Callable[[Any], None],
                   on_lost: Callable[[Exception | None], None]) -> CoreSocket:
        """Takes `sock` over: `on_message` gets each message, `on_lost` the end of the connection
        (not after `close()`)."""
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_unix_connection(lambda: cls(on_message, on_lost), sock=sock)
        protocol._transport = cast(asyncio.Transport, transport)  # uvloop calls connection_made a turn later
        return protocol

    def send(self, message: Any) -> None:
        assert self._transport is not None
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self._transport.writelines([_HEADER.pack(len(data)), data])

    def close(self) -> None:
        """Closes once what was sent is written; the end this causes is not reported."""
        self._closing = True
        if self._transport is not None:
            self._transport.close()

    # ---- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is one, not a subclass

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while len(buffer) - start >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buffer, start)
            end = start + _HEADER.size + size
            if len(buffer) < end:
                break
            with memoryview(buffer) as view:
                message = pickle.loads(view[start + _HEADER.size:end])
            start = end
            self._on_message(message)
        del buffer[:start]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closing:
            self._on_lost(exc)
