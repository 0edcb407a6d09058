"""Rank 0's step messages to the ranks it spawned on this machine, through a shared-memory ring.

Every engine step starts with rank 0 handing the step's inputs to the other ranks; over the gloo group
that is a pickle sent through TCP on the loopback interface, which costs hundreds of microseconds a step
(a decode step's message and a gloo all-reduce as the answer: 750-1,140 us round trip on a 2-core machine,
280 us through this channel), a sizable part of a batch-1 decode step of a 6B model on two GPUs. Here the
pickle goes into one of `SLOTS` slots of a shared-memory buffer instead, and the readers, which poll the
slot's sequence number, see it within microseconds.

Layout: a header of 8-byte words (one "messages read" counter per reader), then the slots, each
[message number, payload length, payload]. Rank 0 writes the payload and its length before the message
number, and reuses a slot only after every reader has counted the message it held.
A message larger than a slot travels over the gloo group instead (the slot says so), and so does every
message when the ranks were not spawned from this process (torchrun).

A reader polls: busily for a short while after a message (steps follow each other closely), then with
sleeps of `SHORT_SLEEP_S`, then of `IDLE_SLEEP_S` once the server has been idle for a second; it gives
up when rank 0's process is gone.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import struct
import sys
import time
from collections.abc import Callable
from multiprocessing import shared_memory

SLOTS = 4
SLOT_BYTES = 4 << 20
WORD = struct.Struct("<q")
SLOT_HEADER = struct.Struct("<qq")  # message number, payload length (-1: sent over the gloo group)
OVER_GLOO = -1
BUSY_POLL_S = 0.002  # after this long without a message, a reader starts sleeping between polls
SHORT_SLEEP_S = 0.0005  # between polls for the first second
IDLE_SLEEP_S = 0.002  # between polls after that: an idle server's workers stay near zero CPU


class PeerGone(RuntimeError):
    """The process on the other side of the channel has exited."""


class StepChannel:
    """One writer (rank 0) and `num_readers` readers (ranks 1..N-1) over one shared-memory buffer."""

    def __init__(self, shm: shared_memory.SharedMemory, num_readers: int, reader: int | None):
        self.shm = shm
        self.buf = shm.buf
        self.num_readers = num_readers
        self.reader = reader  # this process's reader index; None for the writer
        self.header_bytes = WORD.size * num_readers
        self.next_message = 0  # the writer's next message number, or the next one this reader expects

    @classmethod
    def create(cls, num_readers: int) -> StepChannel:
        """The writer's side: a fresh buffer; pass `name` to the readers."""
        header = WORD.size * num_readers
        shm = shared_memory.SharedMemory(create=True, size=header + SLOTS * (SLOT_HEADER.size + SLOT_BYTES))
        channel = cls(shm, num_readers, None)
        shm.buf[:header] = bytes(header)
        for slot in range(SLOTS):
            SLOT_HEADER.pack_into(shm.buf, channel._slot(slot), -1, 0)
        return channel

    @classmethod
    def attach(cls, name: str, num_readers: int, reader: int) -> StepChannel:
        """A reader's side of the writer's buffer `name`."""
        if sys.version_info >= (3, 13):
            shm = shared_memory.SharedMemory(name=name, track=False)
        else:
            # Attaching registers the buffer with the resource tracker, which a spawned process shares
            # with its parent; the writer's unlink unregisters it once for both.
            shm = shared_memory.SharedMemory(name=name)
        return cls(shm, num_readers, reader)

    @property
    def name(self) -> str:
        return self.shm.name

    def _slot(self, message: int) -> int:
        return self.header_bytes + (message % SLOTS) * (SLOT_HEADER.size + SLOT_BYTES)

    def _read_count(self, reader: int) -> int:
        return WORD.unpack_from(self.buf, WORD.size * reader)[0]

    def send(
        self, obj: object, over_gloo: Callable[[object], object], readers_alive: Callable[[], bool]
    ) -> None:
        """Writer: hand `obj` to every reader (`over_gloo` sends what does not fit a slot). Waiting for a
        free slot, raises `PeerGone` once `readers_alive()` says a reader has exited."""
        message = self.next_message
        payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        oldest = message - SLOTS  # the message this slot held last
        waited = _Poller()
        while any(self._read_count(r) <= oldest for r in range(self.num_readers)):
            waited.wait(readers_alive)
        start = self._slot(message)
        if len(payload) <= SLOT_BYTES:
            body = start + SLOT_HEADER.size
            self.buf[body : body + len(payload)] = payload
            WORD.pack_into(self.buf, start + WORD.size, len(payload))
            WORD.pack_into(self.buf, start, message)  # published: readers may take it now
        else:
            WORD.pack_into(self.buf, start + WORD.size, OVER_GLOO)
            WORD.pack_into(self.buf, start, message)
            over_gloo(obj)
        self.next_message = message + 1

    def receive(self, over_gloo: Callable[[], object], writer_alive: Callable[[], bool]) -> object:
        """Reader: the writer's next object, waiting for it as long as the writer's process lives."""
        assert self.reader is not None
        message = self.next_message
        start = self._slot(message)
        poller = _Poller()
        while WORD.unpack_from(self.buf, start)[0] != message:
            poller.wait(writer_alive)
        length = WORD.unpack_from(self.buf, start + WORD.size)[0]
        if length == OVER_GLOO:
            obj = over_gloo()
        else:
            body = start + SLOT_HEADER.size
            obj = pickle.loads(self.buf[body : body + length])
        WORD.pack_into(self.buf, WORD.size * self.reader, message + 1)  # the slot is free again
        self.next_message = message + 1
        return obj

    def close(self) -> None:
        """Detach; the writer also removes the buffer."""
        self.buf = None
        with contextlib.suppress(BufferError):  # a view still alive somewhere goes with the process
            self.shm.close()
        if self.reader is None:
            with contextlib.suppress(FileNotFoundError):
                self.shm.unlink()


class _Poller:
    """Waits between polls: not at all at first, then yielding, then sleeping; checks the peer's
    liveness about twice a second once it sleeps."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.next_check = self.start + 0.5

    def wait(self, peer_alive: Callable[[], bool]) -> None:
        now = time.monotonic()
        if now - self.start < BUSY_POLL_S:
            return
        if now - self.start < 10 * BUSY_POLL_S:
            os.sched_yield()
            return
        time.sleep(SHORT_SLEEP_S if now - self.start < 1.0 else IDLE_SLEEP_S)
        if now >= self.next_check:
            self.next_check = now + 0.5
            if not peer_alive():
                raise PeerGone("the other side of the tensor-parallel step channel has exited")
