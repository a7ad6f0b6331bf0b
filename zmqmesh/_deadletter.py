"""Dead letters: requests a queue gave up on, with the reason and every attempt.

The types live in the core so that any sink can implement them without
importing `patterns`: the in-memory `MemoryDeadLetters` here, and the durable
spool (`zmqmesh._spool`), which persists the same `DeadLetter` records.
A `DeadLetter` is a frozen msgspec Struct, so a sink can store it with one
`msgspec.msgpack.encode(letter)` and read it back with a `Decoder(DeadLetter)`.
"""

from __future__ import annotations

import collections
import threading
from typing import Protocol, runtime_checkable

import msgspec

from ._envelope import read_envelope
from ._errors import RemoteProtocolError

__all__ = ["Attempt", "DeadLetter", "DeadLetterSink", "MemoryDeadLetters"]


class Attempt(msgspec.Struct, frozen=True):
    """One delivery attempt of a request to a worker, and how it ended.

    Times are seconds since the queue received the request, so that they mean
    the same thing on any host and after a restart.
    """

    worker: bytes  # the worker's ZeroMQ routing id
    dispatched_after: float
    failed_after: float
    reason: str


class DeadLetter(msgspec.Struct, frozen=True):
    """A request that was not answered: its frames, why, and its attempt history."""

    message_id: bytes  # sender + seq of the request's Data header; b"" for a raw request
    frames: list[bytes]  # the request's frames as received: [header, body...] or [Inline]
    reason: str
    attempts: list[Attempt]
    priority: int = 0
    dead_ns: int = 0  # wall-clock time it was dead-lettered (ns since the epoch)
    queue: str = ""  # name of the queue that gave up on it

    @property
    def raw(self) -> bool:
        """True for a request from a plain REQ client (no zmqmesh envelope)."""
        return not self.message_id

    @property
    def body(self) -> list[bytes]:
        """The request's body frames: those after its header, or the one inside an inline frame."""
        if self.raw:
            return list(self.frames)
        try:
            return read_envelope(self.frames)[1]
        except RemoteProtocolError:
            return self.frames[1:]


@runtime_checkable
class DeadLetterSink(Protocol):
    """Where a queue puts its dead letters (memory now, the durable spool later)."""

    def add(self, letter: DeadLetter) -> None:
        """Keep `letter`; called from the queue's loop, so it should be quick."""
        ...

    def list(self) -> list[DeadLetter]:
        """Every kept letter, oldest first."""
        ...


class MemoryDeadLetters:
    """Dead letters in memory, the newest `maxlen` kept (older ones counted in `.evicted`).

    Thread-safe: a queue adds from its loop thread while the application lists.
    """

    def __init__(self, maxlen: int = 10_000) -> None:
        if maxlen < 1:
            raise ValueError(f"MemoryDeadLetters needs maxlen >= 1, got {maxlen}")
        self._letters: collections.deque[DeadLetter] = collections.deque(maxlen=maxlen)
        self._lock = threading.Lock()
        self.evicted = 0

    def add(self, letter: DeadLetter) -> None:
        with self._lock:
            if len(self._letters) == self._letters.maxlen:
                self.evicted += 1
            self._letters.append(letter)

    def list(self) -> list[DeadLetter]:
        with self._lock:
            return list(self._letters)

    def __len__(self) -> int:
        return len(self._letters)
