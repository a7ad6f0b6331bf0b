"""Opening a spool's file safely: create atomically, check before writing, lock, load.

The order matters. A new spool is built in a temporary file and hard-linked
into place, so a path holds either nothing or a whole spool (`link` never
replaces a file). An existing file is opened read-only, locked (`flock`: one
writer process per spool) and its raw header checked (`check_header`) before
SQLite opens it, so a garbage file, another program's database or a spool
from a newer zmqmesh is refused without a byte written. Only then does SQLite
open it for writing (and roll forward its write-ahead log if the last writer
died). State is loaded with index look-ups only, so opening a spool holding a
million messages costs milliseconds.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from typing import NamedTuple

from ._errors import CorruptRecord, SpoolError
from ._spool_schema import APP_NAME, SCHEMA, check_header, check_version, translate

__all__ = ["Loaded", "SpoolFiles", "check_schema", "create", "load"]

_SYNCHRONOUS = {"always": "FULL", "batch": "NORMAL", "off": "OFF"}

# Spools open in this process, by (st_dev, st_ino). A second open in the same
# process is refused before it opens a file descriptor: closing any descriptor
# of an SQLite file drops the process's POSIX locks on it (see "How To Corrupt
# An SQLite Database File", section 2.2, https://www.sqlite.org/howtocorrupt.html).
_OPEN: dict[tuple[int, int], str] = {}
_OPEN_LOCK = threading.Lock()


def _uri(path: str) -> str:
    return "file:" + urllib.parse.quote(path)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create(path: str, directory: str, replace_empty: bool = False) -> None:
    """Build a spool in a temporary file, then link it into place (never over a file)."""
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.executescript(f"BEGIN; {SCHEMA} COMMIT;")
            conn.execute("INSERT INTO meta VALUES ('created_ns', ?)", (time.time_ns(),))
            conn.execute("PRAGMA journal_mode = WAL")
        finally:
            conn.close()
        _fsync_path(tmp)
        if replace_empty:
            if os.path.getsize(path) != 0:
                raise SpoolError(f"spool {path}: changed while being opened; retry")
            os.replace(tmp, path)
        else:
            with contextlib.suppress(FileExistsError):  # another process won the race
                os.link(tmp, path)
        _fsync_path(directory)
    finally:
        for leftover in (tmp, tmp + "-wal", tmp + "-shm", tmp + "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)


class SpoolFiles:
    """The descriptors one open spool holds besides SQLite's: the lock and the WAL."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.directory = os.path.dirname(path) or "."
        self.fd = -1  # read-only, flock'ed for the spool's lifetime; closed after SQLite
        self.wal_fd = -1
        self.key: tuple[int, int] | None = None

    def open(self, policy: str) -> tuple[sqlite3.Connection, int]:
        """Check, lock and open the spool; return the writer connection and schema version."""
        path, directory = self.path, self.directory
        if not os.path.isdir(directory):
            raise SpoolError(f"spool {path}: the directory {directory} does not exist")
        if os.path.isdir(path):
            raise SpoolError(f"spool {path}: is a directory, not a spool file")
        if not os.path.exists(path):
            self._check_writable(directory)
            create(path, directory)
        elif os.path.getsize(path) == 0:  # an empty file holds nothing: make it a spool
            self._check_writable(directory)
            create(path, directory, replace_empty=True)
        st = os.stat(path)
        key = (st.st_dev, st.st_ino)
        with _OPEN_LOCK:
            if key in _OPEN:
                raise SpoolError(f"spool {path}: already open in this process (as {_OPEN[key]})")
            _OPEN[key] = path
            self.key = key
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SpoolError(
                f"spool {path}: in use by another process (one writer per spool); "
                f"stop it first, or use 'zmqmesh spool stats' to look inside"
            ) from None
        if check_header(path, self.fd):
            raise SpoolError(f"spool {path}: emptied while being opened; retry")
        self._check_writable(path)
        self._check_writable(directory)
        # The schema check reads through a read-only connection: if the file turns
        # out to be from a newer zmqmesh (say, its upgrade is still in the WAL),
        # closing it must not checkpoint anything into the database.
        probe = sqlite3.connect(f"{_uri(path)}?mode=ro", uri=True, isolation_level=None)
        try:
            version = check_schema(path, probe)
        finally:
            probe.close()
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {_SYNCHRONOUS[policy]}")
            conn.execute("PRAGMA journal_size_limit = 67108864")
            conn.execute("PRAGMA cache_size = -16384")
        except BaseException:
            conn.close()
            raise
        # The -wal and -shm directory entries survive a power loss from here on.
        _fsync_path(directory)
        return conn, version

    def reader(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
        conn.execute("PRAGMA query_only = 1")
        return conn

    def _check_writable(self, target: str) -> None:
        # access() reports a read-only mount even to root (EROFS).
        if not os.access(target, os.W_OK):
            raise SpoolError(
                f"spool {self.path}: {target} is not writable (a read-only file system or "
                f"permissions); the spool needs write access to the file and its directory"
            )

    def fsync_wal(self) -> None:
        """fsync the write-ahead log (its inode lives as long as a connection is open)."""
        if self.wal_fd < 0:
            self.wal_fd = os.open(self.path + "-wal", os.O_RDONLY | os.O_CLOEXEC)
        os.fsync(self.wal_fd)

    def release(self) -> None:
        """Close the descriptors (after SQLite's connections) and leave the registry."""
        for attr in ("wal_fd", "fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)
        with _OPEN_LOCK:
            if self.key is not None:
                _OPEN.pop(self.key, None)
                self.key = None


def check_schema(path: str, conn: sqlite3.Connection) -> int:
    """The schema version, once the open database proves to be a spool we can read."""
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        check_version(path, version)
        row = conn.execute("SELECT value FROM meta WHERE key = 'application'").fetchone()
    except sqlite3.Error as exc:
        raise translate(path, "open", exc) from exc
    if row is None or row[0] != APP_NAME:
        raise CorruptRecord(
            f"spool {path}: has the spool application id but its meta table does not name "
            f"a zmqmesh spool; refusing to use it"
        )
    return int(version)


class Loaded(NamedTuple):
    next_seq: int
    pending: int
    pending_bytes: int
    dead: int
    dead_bytes: int
    prio_pending: int
    dedup: list[tuple[bytes, int, int]]  # (message id, n, at_ns), oldest first
    dedup_next: int


def load(
    conn: sqlite3.Connection, wall: Callable[[], float], max_age: float, max_count: int
) -> Loaded:
    """Counts and sequence numbers from index look-ups only: no table scan."""
    last, pending, pbytes, dead, dbytes = conn.execute(
        "SELECT last_seq, pending, pending_bytes, dead, dead_bytes FROM counts"
    ).fetchone()
    top = max(
        last,
        conn.execute("SELECT coalesce(max(seq), 0) FROM messages").fetchone()[0],
        conn.execute("SELECT coalesce(max(seq), 0) FROM dead").fetchone()[0],
    )
    prio = conn.execute("SELECT count(*) FROM messages WHERE priority > 0").fetchone()[0]
    cutoff = int((wall() - max_age) * 1e9)
    rows = conn.execute(
        "SELECT message_id, n, at_ns FROM dedup WHERE at_ns >= ? ORDER BY n DESC LIMIT ?",
        (cutoff, max_count),
    ).fetchall()
    rows.reverse()
    dedup_next = conn.execute("SELECT coalesce(max(n), 0) FROM dedup").fetchone()[0] + 1
    return Loaded(top + 1, pending, pbytes, dead, dbytes, prio, rows, dedup_next)
