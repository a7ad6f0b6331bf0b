"""The spool's file format: records, schema, header checks and error translation.

A spool is one SQLite database (DESIGN.md section 5). Before zmqmesh writes a
single byte to an existing file it reads the 100-byte SQLite header directly
(https://www.sqlite.org/fileformat2.html#the_database_header): the magic string,
the application id at offset 68 and the user version (our schema version) at
offset 60. A file that is not SQLite, an SQLite database of another program,
or a spool from a newer zmqmesh is refused with an error and left untouched.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from typing import Final, Literal

import msgspec

from ._deadletter import Attempt, DeadLetter
from ._errors import CorruptRecord, LocalProtocolError, SpoolError

__all__ = ["DeadRecord", "FsyncPolicy", "FullPolicy", "SpoolEntry", "SpoolStats"]

#: PRAGMA application_id of every spool ("zmSP"), stored at offset 68 of the header.
APP_ID: Final = 0x7A6D5350
#: Name in the meta table, a second check once the database is open.
APP_NAME: Final = "zmqmesh-spool"
#: PRAGMA user_version: the schema this code writes and the newest it can read.
SCHEMA_VERSION: Final = 1
SQLITE_MAGIC: Final = b"SQLite format 3\x00"

FsyncPolicy = Literal["always", "batch", "off"]
FullPolicy = Literal["block", "refuse"]
POLICIES: Final = ("always", "batch", "off")

# How a message's frames are stored in `body`: a single frame as it is (the
# common case, no copy), several frames as a msgpack array.
FRAMING_SINGLE: Final = 0
FRAMING_MSGPACK: Final = 1

SCHEMA: Final = f"""
PRAGMA application_id = {APP_ID};
PRAGMA user_version = {SCHEMA_VERSION};
CREATE TABLE meta (key TEXT PRIMARY KEY, value NOT NULL);
CREATE TABLE counts (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    last_seq INTEGER NOT NULL,
    pending INTEGER NOT NULL,
    pending_bytes INTEGER NOT NULL,
    dead INTEGER NOT NULL,
    dead_bytes INTEGER NOT NULL
);
CREATE TABLE messages (
    seq INTEGER PRIMARY KEY,
    priority INTEGER NOT NULL,
    message_id BLOB NOT NULL,
    framing INTEGER NOT NULL,
    body BLOB NOT NULL,
    created_ns INTEGER NOT NULL
);
CREATE INDEX messages_by_priority ON messages (priority DESC, seq) WHERE priority > 0;
CREATE TABLE dead (
    seq INTEGER PRIMARY KEY,
    priority INTEGER NOT NULL,
    message_id BLOB NOT NULL,
    framing INTEGER NOT NULL,
    body BLOB NOT NULL,
    created_ns INTEGER NOT NULL,
    reason TEXT NOT NULL,
    attempts BLOB NOT NULL,
    first_failure_ns INTEGER NOT NULL,
    last_failure_ns INTEGER NOT NULL,
    queue TEXT NOT NULL
);
CREATE TABLE dedup (n INTEGER PRIMARY KEY, message_id BLOB NOT NULL, at_ns INTEGER NOT NULL);
INSERT INTO meta (key, value) VALUES ('application', '{APP_NAME}');
INSERT INTO counts VALUES (0, 0, 0, 0, 0, 0);
"""

MESSAGE_COLUMNS: Final = "seq, priority, message_id, framing, body, created_ns"
DEAD_COLUMNS: Final = (
    "seq, priority, message_id, framing, body, created_ns, reason, attempts, "
    "first_failure_ns, last_failure_ns, queue"
)

_frames_encoder = msgspec.msgpack.Encoder()
_frames_decoder = msgspec.msgpack.Decoder(list[bytes])
_attempts_decoder = msgspec.msgpack.Decoder(list[Attempt])


class SpoolEntry(msgspec.Struct, frozen=True):
    """A pending message: its spool sequence number (the id to `ack`) and its frames."""

    seq: int
    frames: list[bytes]
    message_id: bytes = b""  # the sender's message id (Data header), b"" if none
    priority: int = 0
    created_ns: int = 0  # wall-clock time of the append, ns since the epoch

    @property
    def payload(self) -> bytes:
        """The frames joined (the one frame of a single-frame message, without a copy)."""
        return self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)


class DeadRecord(msgspec.Struct, frozen=True):
    """A dead letter as the spool keeps it: the message, why it died, every attempt."""

    seq: int
    frames: list[bytes]
    reason: str
    attempts: list[Attempt]
    first_failure_ns: int  # wall-clock ns since the epoch
    last_failure_ns: int
    message_id: bytes = b""
    priority: int = 0
    created_ns: int = 0
    queue: str = ""

    def to_dead_letter(self) -> DeadLetter:
        """The same letter as the `DeadLetter` a queue hands to a `DeadLetterSink`."""
        return DeadLetter(
            message_id=self.message_id,
            frames=self.frames,
            reason=self.reason,
            attempts=self.attempts,
            priority=self.priority,
            dead_ns=self.last_failure_ns,
            queue=self.queue,
        )


class SpoolStats(msgspec.Struct, frozen=True):
    """What a spool holds (counts are exact: kept in the file, updated in every commit)."""

    path: str
    pending: int
    pending_bytes: int
    inflight: int  # pending messages taken and not yet acknowledged or released
    dead: int
    dead_bytes: int
    dedup: int
    oldest_pending_ns: int | None  # created_ns of the oldest pending message
    file_bytes: int  # database plus write-ahead log on disk
    schema_version: int


def encode_frames(
    frames: bytes | bytearray | memoryview | Sequence[bytes],
) -> tuple[int, bytes]:
    """(framing, body) for a message given as one frame or a sequence of frames."""
    if isinstance(frames, bytes):
        return FRAMING_SINGLE, frames
    if isinstance(frames, (bytearray, memoryview)):
        return FRAMING_SINGLE, bytes(frames)
    try:
        if isinstance(frames, str) or any(isinstance(f, str) for f in frames):
            raise TypeError("str")
        if len(frames) == 1:
            return FRAMING_SINGLE, bytes(frames[0])
        return FRAMING_MSGPACK, _frames_encoder.encode([bytes(f) for f in frames])
    except TypeError:
        raise LocalProtocolError(
            f"a spooled message is bytes or a list of bytes frames, not {type(frames).__name__}"
            f" (encode text and objects first, e.g. with zmqmesh.encode_body)"
        ) from None


def decode_frames(path: str, seq: int, framing: int, body: bytes) -> list[bytes]:
    if framing == FRAMING_SINGLE:
        return [body]
    try:
        return _frames_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise CorruptRecord(f"spool {path}: message {seq} has unreadable frames: {exc}") from exc


def entry_from_row(path: str, row: tuple[int, int, bytes, int, bytes, int]) -> SpoolEntry:
    seq, priority, message_id, framing, body, created_ns = row
    return SpoolEntry(
        seq, decode_frames(path, seq, framing, body), message_id, priority, created_ns
    )


def dead_from_row(path: str, row: tuple[object, ...]) -> DeadRecord:
    seq, priority, message_id, framing, body, created_ns, reason, attempts, first, last, queue = row
    assert isinstance(seq, int) and isinstance(framing, int) and isinstance(body, bytes)
    assert isinstance(attempts, bytes)
    try:
        history = _attempts_decoder.decode(attempts)
    except msgspec.DecodeError as exc:
        raise CorruptRecord(f"spool {path}: dead letter {seq} has an unreadable history") from exc
    return DeadRecord(
        seq=seq,
        frames=decode_frames(path, seq, framing, body),
        reason=str(reason),
        attempts=history,
        first_failure_ns=int(first),  # type: ignore[call-overload]
        last_failure_ns=int(last),  # type: ignore[call-overload]
        message_id=bytes(message_id),  # type: ignore[call-overload]
        priority=int(priority),  # type: ignore[call-overload]
        created_ns=int(created_ns),  # type: ignore[call-overload]
        queue=str(queue),
    )


def check_header(path: str, fd: int) -> bool:
    """Refuse a file that is not a spool this code can read; True if it is empty (new).

    Reads the raw header only: nothing is written and SQLite has not touched
    the file yet, so a refused file stays byte-for-byte as it was.
    """
    size = os.fstat(fd).st_size
    if size == 0:
        return True
    head = os.pread(fd, 100, 0)
    if len(head) < 100 or not head.startswith(SQLITE_MAGIC):
        raise CorruptRecord(
            f"spool {path}: not a zmqmesh spool (not an SQLite database: it starts with "
            f"{head[:16]!r}); refusing to open or overwrite it; move it away or use another path"
        )
    app_id = int.from_bytes(head[68:72], "big")
    version = int.from_bytes(head[60:64], "big")
    if app_id != APP_ID:
        raise CorruptRecord(
            f"spool {path}: an SQLite database but not a zmqmesh spool (application id "
            f"{app_id:#x}, a spool has {APP_ID:#x}); refusing to open or overwrite it"
        )
    check_version(path, version)
    return False


def check_version(path: str, version: int) -> None:
    if version > SCHEMA_VERSION:
        raise SpoolError(
            f"spool {path}: written by a newer zmqmesh (spool schema {version}, this version "
            f"reads up to {SCHEMA_VERSION}); open it with that newer zmqmesh or upgrade"
        )
    if version < 1:
        raise CorruptRecord(
            f"spool {path}: has the spool application id but no schema version "
            f"(user_version {version}); refusing to open or overwrite it"
        )


# Primary result codes (https://www.sqlite.org/rescode.html).
_SQLITE_PERM = 3
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_READONLY = 8
_SQLITE_IOERR = 10
_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_CANTOPEN = 14
_SQLITE_NOTADB = 26


def translate(path: str, what: str, exc: BaseException) -> SpoolError:
    """A `SpoolError` naming the spool, the operation and what to do, for `exc`."""
    if isinstance(exc, SpoolError):
        return exc
    if isinstance(exc, OSError) and not isinstance(exc, sqlite3.Error):
        if exc.errno == 28:  # ENOSPC
            return SpoolError(f"spool {path}: {what} failed: the disk is full; free space")
        if exc.errno in (1, 13, 30):  # EPERM, EACCES, EROFS
            return SpoolError(
                f"spool {path}: {what} failed: not writable ({exc.strerror}); the spool needs "
                f"write access to the file and its directory"
            )
        return SpoolError(f"spool {path}: {what} failed: {exc.strerror or exc}")
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    if primary == _SQLITE_FULL:
        return SpoolError(
            f"spool {path}: {what} failed: the disk is full ({exc}); nothing in this write "
            f"was acknowledged; free space on the file system and retry"
        )
    if primary in (_SQLITE_READONLY, _SQLITE_PERM, _SQLITE_CANTOPEN):
        return SpoolError(
            f"spool {path}: {what} failed: cannot write ({exc}); the spool needs write access "
            f"to the file and its directory (a read-only file system?)"
        )
    if primary in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return CorruptRecord(f"spool {path}: {what} failed: the file is damaged ({exc})")
    if primary in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return SpoolError(f"spool {path}: {what} failed: locked by another connection ({exc})")
    if primary == _SQLITE_IOERR:
        return SpoolError(f"spool {path}: {what} failed: I/O error ({exc}); check the disk")
    return SpoolError(f"spool {path}: {what} failed: {exc}")
