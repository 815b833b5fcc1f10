"""Shared-memory all-reduce and broadcast for tensor-parallel ranks on one CPU host.

NOTE: gloo over loopback TCP takes ~650 us for a 2 KB all-reduce and ~1.1 ms for a step's
broadcast on the 2-core box (measured), and a decode step makes two all-reduces per layer: at
batch 1 that was most of a TP=2 step. Ranks on one host exchange through one shared buffer
instead: each writes its part and then a sequence number, waits for the others' numbers, and
sums every part in rank order, so all ranks hold the same bits. On x86 stores become visible in
program order, so a published sequence number implies the data before it is visible too.
Messages over the slot size (prefill-sized ones, where bandwidth matters more than latency)
still go through gloo.

NOTE: the buffer is a plain file in /dev/shm mapped by every rank, not
`multiprocessing.shared_memory`: that registers each attach with a resource tracker, which
local ranks share with rank 0 and Ray actors do not, so no one unregister-or-not rule avoids
both a KeyError at unlink and a segment unlinked behind rank 0's back.
"""

from __future__ import annotations

import mmap
import os
import pickle
import platform
import secrets
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from engine.outputs import EngineDeadError

SLOT_BYTES = 1 << 20  # per rank and buffer: a decode step's hidden states (64 x 4096 bf16 = 512 KiB)
_REDUCE, _BCAST, _ACK, _PID = range(4)  # header columns, one row per rank
_SPINS_BEFORE_SLEEP = 20_000  # then an idle rank (no steps coming) sleeps between polls
_SPINS_PER_LIVENESS_CHECK = 512
_SHM_DIR = Path("/dev/shm")


class ShmChannel:
    """This rank's view of the group's shared buffer: header [W, 4] int64, then two broadcast
    regions, then two sets of W all-reduce slots (double-buffered: a rank reuses a buffer only
    after every rank has published the next sequence number, so has finished reading it)."""

    def __init__(self, mapping: mmap.mmap, rank: int, world_size: int) -> None:
        self.mapping, self.rank, self.world_size = mapping, rank, world_size
        header_bytes = world_size * 4 * 8
        self.header = np.ndarray((world_size, 4), dtype=np.int64, buffer=mapping)  # [W, 4]
        raw = torch.frombuffer(mapping, dtype=torch.uint8)
        bcast_end = header_bytes + 2 * (8 + SLOT_BYTES)
        self.bcast = raw[header_bytes:bcast_end].view(2, 8 + SLOT_BYTES)  # [2, length + payload]
        self.slots = raw[bcast_end:].view(2, world_size, SLOT_BYTES)  # [2, W, bytes]
        self.header[rank, _PID] = os.getpid()
        self.reduce_seq = 0
        self.bcast_seq = 0

    @staticmethod
    def size(world_size: int) -> int:
        return world_size * 4 * 8 + 2 * (8 + SLOT_BYTES) + 2 * world_size * SLOT_BYTES

    @classmethod
    def open(cls, rank: int, world_size: int, group: Any) -> "ShmChannel | None":
        """Collective over the gloo group: a channel when every rank is on rank 0's host (and x86,
        and /dev/shm has room), else None on every rank (gloo carries everything)."""
        size = cls.size(world_size)
        mapping: mmap.mmap | None = None
        name: str | None = None
        if rank == 0 and _shm_room() >= 2 * size and platform.machine() in ("x86_64", "AMD64"):
            name = f"mixtral-serve-tp-{secrets.token_hex(8)}"
            mapping = _map(_SHM_DIR / name, size, create=True)
        box = [(name if mapping else None, socket.gethostname())]
        dist.broadcast_object_list(box, src=0, group=group)
        name, host = box[0]  # rank 0's, on every rank
        if rank > 0 and name is not None and host == socket.gethostname():
            mapping = _map(_SHM_DIR / name, size, create=False)
        ok = torch.tensor([int(mapping is not None)])
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
        if not ok.item():
            if mapping is not None:
                mapping.close()
                if rank == 0:
                    (_SHM_DIR / name).unlink()
            return None
        channel = cls(mapping, rank, world_size)
        dist.barrier(group=group)  # every rank is attached, and its pid in the header
        if rank == 0:
            (_SHM_DIR / name).unlink()  # the mappings live on; a crashed replica leaves nothing in /dev/shm
        return channel

    def all_reduce(self, x: torch.Tensor) -> bool:
        """x summed over ranks, in place; False (x untouched) when it does not fit a slot."""
        nbytes = x.numel() * x.element_size()
        if nbytes > SLOT_BYTES or not x.is_contiguous():
            return False
        self.reduce_seq += 1
        buf = self.slots[self.reduce_seq % 2]  # [W, bytes]
        buf[self.rank, :nbytes].copy_(x.view(-1).view(torch.uint8))
        self.header[self.rank, _REDUCE] = self.reduce_seq
        self._wait(_REDUCE, self.reduce_seq, range(self.world_size))
        parts = buf[:, :nbytes].view(x.dtype).view(self.world_size, *x.shape)  # [W, ...]
        # Rank order and fp32 accumulation, the same on every rank.
        x.copy_(parts.sum(dim=0, dtype=torch.float32) if x.is_floating_point() else parts.sum(dim=0))
        return True

    def broadcast(self, obj: Any, fallback: Any) -> Any:
        """Rank 0's `obj` on every rank; `fallback(obj)` carries one too big for the buffer."""
        self.bcast_seq += 1
        region = self.bcast[self.bcast_seq % 2]  # [8 + bytes]
        length = region[:8].view(torch.int64)
        if self.rank == 0:
            # The region was last used two broadcasts ago: every rank must have read it.
            self._wait(_ACK, self.bcast_seq - 2, range(1, self.world_size))
            data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            fits = len(data) <= SLOT_BYTES
            if fits:
                region[8 : 8 + len(data)].copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            length[0] = len(data) if fits else -1
            self.header[0, _BCAST] = self.bcast_seq
            return obj if fits else fallback(obj)
        self._wait(_BCAST, self.bcast_seq, [0])
        n = int(length[0])
        obj = pickle.loads(region[8 : 8 + n].numpy().tobytes()) if n >= 0 else None
        self.header[self.rank, _ACK] = self.bcast_seq
        return obj if n >= 0 else fallback(None)

    def _wait(self, column: int, seq: int, ranks: Any) -> None:
        """Until every rank in `ranks` has published `seq` in `column`; EngineDeadError when one of
        them has exited (its process is gone), so a lost rank never hangs the others."""
        rows = list(ranks)
        spins = 0
        while self.header[rows, column].min(initial=seq) < seq:
            spins += 1
            if spins % _SPINS_PER_LIVENESS_CHECK == 0:
                dead = [r for r in rows if not _alive(int(self.header[r, _PID]))]
                if dead:
                    raise EngineDeadError(f"tensor-parallel rank(s) {dead} died")
            if spins > _SPINS_BEFORE_SLEEP:  # idle: no step is coming soon
                time.sleep(0.0005 if spins < 10 * _SPINS_BEFORE_SLEEP else 0.002)

    def close(self) -> None:
        self.header = None  # type: ignore[assignment]  # drop the views before closing the mapping
        self.bcast = self.slots = None  # type: ignore[assignment]
        self.mapping.close()


def _map(path: Path, size: int, create: bool) -> mmap.mmap | None:
    """`path` mapped read-write; with `create`, a new file of `size` bytes, its pages allocated now
    (a full /dev/shm fails here, not as SIGBUS mid-step). None when that fails."""
    try:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
    except OSError:
        return None
    try:
        if create:
            os.posix_fallocate(fd, 0, size)
        return mmap.mmap(fd, size)
    except OSError:
        if create:
            path.unlink()
        return None
    finally:
        os.close(fd)


def _shm_room() -> int:
    try:
        st = os.statvfs(_SHM_DIR)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def _alive(pid: int) -> bool:
    """Whether process `pid` runs: gone, or a zombie (exited, not yet reaped by its parent), is dead."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]  # the field after "(comm)"
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
