"""Paranoid Pirate Protocol (ZeroMQ RFC 6) wire pieces shared by the queue and worker machines.

RFC 6 commands: READY is the one-frame message 0x01, HEARTBEAT the one-frame
message 0x02; a REQUEST or REPLY is an address stack, an empty delimiter
frame, and one or more content frames. zmqmesh envelopes ride as the first
content frame; a content that does not start with one is a raw request (from
a plain REQ client) and is served and answered raw.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final

from zmqmesh import PROTOCOL_VERSION

__all__ = ["HEARTBEAT", "READY", "LogOnce", "find_delimiter", "foreign_version", "hexid"]

READY: Final = b"\x01"
HEARTBEAT: Final = b"\x02"


def find_delimiter(frames: Sequence[bytes], start: int = 0) -> int:
    """Index of the first empty frame at or after `start`, or -1 (RFC 6 address stack end)."""
    for i in range(start, len(frames)):
        if not frames[i]:
            return i
    return -1


def foreign_version(frame: bytes) -> bool:
    """True when `frame` looks like a zmqmesh header of another protocol version.

    Such a frame must be refused, not served as a raw request: a peer speaking a
    newer envelope would otherwise get an answer it cannot read. A header is a
    msgpack array `[tag, version, ...]` with a small tag (0-2) and version.
    """
    if len(frame) < 3:
        return False
    first = frame[0]
    if 0x92 <= first <= 0x9F:  # fixarray of 2-15 items
        offset = 1
    elif first == 0xDC and len(frame) >= 5:  # array 16
        offset = 3
    else:
        return False
    tag, version = frame[offset], frame[offset + 1]
    return tag <= 2 and version <= 0x7F and version != PROTOCOL_VERSION


def hexid(peer: bytes) -> str:
    """A routing id as printable text for logs and errors."""
    return peer.hex() if peer else "(none)"


class LogOnce:
    """Log bad input once per peer (then only count it), so garbage cannot flood the log."""

    __slots__ = ("_limit", "_logger", "_seen")

    def __init__(self, logger: logging.Logger, limit: int = 4096) -> None:
        self._logger = logger
        self._seen: set[bytes] = set()
        self._limit = limit

    def __call__(self, peer: bytes, message: str) -> None:
        if peer in self._seen:
            return
        if len(self._seen) >= self._limit:
            # Forget old peers rather than grow without bound; they may log again.
            self._seen.clear()
        self._seen.add(peer)
        self._logger.warning("%s (further bad input from this peer is only counted)", message)
