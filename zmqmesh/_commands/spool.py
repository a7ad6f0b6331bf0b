"""`zmqmesh spool stats|dead|replay|purge PATH`: look inside a spool, replay dead letters.

`stats` and `dead` only read, so they work on a spool another process has
open (SQLite WAL readers never block its writer). `replay` and `purge` write,
so they open the spool as its one writer and fail (exit 1) while another
process holds it. A path that is missing, not a spool, or from a newer
zmqmesh is a usage error (exit 2); nothing is ever created or changed then.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import json
import os
import sqlite3
import sys
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

from .._errors import ConfigError, SpoolError
from .._spool import Spool
from .._spool_files import check_schema
from .._spool_schema import DEAD_COLUMNS, DeadRecord, check_header, dead_from_row, translate


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "spool",
        help="inspect a durable spool; replay or purge its dead letters",
        description="Inspect a zmqmesh spool file (counts, dead letters) and move dead "
        "letters back to pending or delete them. Exit 2 if PATH is not a spool.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    p = actions.add_parser("stats", help="counts, bytes, oldest pending message")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=run_stats)

    p = actions.add_parser("dead", help="dead letters with their reasons and attempts")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--json", action="store_true", help="one JSON object per dead letter")
    p.add_argument("--limit", type=int, default=None, help="show at most N (oldest first)")
    p.set_defaults(func=run_dead)

    p = actions.add_parser("replay", help="move dead letters back to pending")
    p.add_argument("path", metavar="PATH")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--id", type=int, action="append", dest="ids", metavar="ID", help="a dead letter's seq"
    )
    which.add_argument("--all", action="store_true", help="every dead letter")
    p.set_defaults(func=run_replay)

    p = actions.add_parser("purge", help="delete dead letters")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--dead", action="store_true", required=True, help="purge dead letters")
    p.add_argument(
        "--id", type=int, action="append", dest="ids", metavar="ID", help="only these seqs"
    )
    p.set_defaults(func=run_purge)


# ------------------------------------------------------------------ reading
def _check_path(path: str) -> bool:
    """Refuse (exit 2) what is not a spool; True if a process holds it open."""
    if not os.path.exists(path):
        raise ConfigError(f"no spool at {path} (the file does not exist)")
    if os.path.isdir(path):
        raise ConfigError(f"{path} is a directory, not a spool file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        try:
            if check_header(path, fd):
                raise ConfigError(f"{path} is empty, not a spool")
        except SpoolError as exc:
            raise ConfigError(str(exc)) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False
    finally:
        os.close(fd)  # before SQLite opens the file: no POSIX lock of ours to drop yet


@contextlib.contextmanager
def _reader(path: str) -> Iterator[tuple[sqlite3.Connection, bool]]:
    in_use = _check_path(path)
    directory = os.path.dirname(os.path.abspath(path))
    if os.access(directory, os.W_OK):
        conn = sqlite3.connect(path, isolation_level=None)
    else:  # a read-only place: nobody can be writing it, read the file as it is
        uri = f"file:{urllib.parse.quote(path)}?immutable=1"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None)
    try:
        conn.execute("PRAGMA query_only = 1")
        try:
            check_schema(path, conn)
        except SpoolError as exc:
            raise ConfigError(str(exc)) from exc
        yield conn, in_use
    except sqlite3.Error as exc:
        raise translate(path, "read", exc) from exc
    finally:
        conn.close()


def _when(ns: int | None) -> str:
    if ns is None:
        return "-"
    stamp = datetime.datetime.fromtimestamp(ns / 1e9, tz=datetime.UTC)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def run_stats(args: argparse.Namespace) -> int:
    path = os.path.abspath(args.path)
    with _reader(path) as (conn, in_use):
        _last, pending, pbytes, dead, dbytes = conn.execute(
            "SELECT last_seq, pending, pending_bytes, dead, dead_bytes FROM counts"
        ).fetchone()
        dedup = conn.execute("SELECT count(*) FROM dedup").fetchone()[0]
        row = conn.execute("SELECT created_ns FROM messages ORDER BY seq LIMIT 1").fetchone()
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    oldest = None if row is None else row[0]
    size = sum(os.path.getsize(path + s) for s in ("", "-wal") if os.path.exists(path + s))
    age = None if oldest is None else max(0.0, (time.time_ns() - oldest) / 1e9)
    out: dict[str, Any] = {
        "path": path,
        "schema_version": version,
        "pending": pending,
        "pending_bytes": pbytes,
        "oldest_pending": _when(oldest) if oldest is not None else None,
        "oldest_pending_age_s": None if age is None else round(age, 3),
        "dead": dead,
        "dead_bytes": dbytes,
        "dedup": dedup,
        "file_bytes": size,
        "in_use": in_use,
    }
    if args.json:
        print(json.dumps(out))
        return 0
    oldest_text = "-" if age is None else f"{out['oldest_pending']} ({age:,.1f} s ago)"
    print(f"spool          {path}")
    print(f"schema         {version}")
    print(f"pending        {pending:,} messages, {pbytes:,} bytes")
    print(f"oldest pending {oldest_text}")
    print(f"dead letters   {dead:,} messages, {dbytes:,} bytes")
    print(f"de-dup window  {dedup:,} ids")
    print(f"on disk        {size:,} bytes (database + write-ahead log)")
    print(f"in use         {'yes (a process has it open)' if in_use else 'no'}")
    return 0


def _dead_json(record: DeadRecord) -> dict[str, Any]:
    return {
        "seq": record.seq,
        "message_id": record.message_id.hex(),
        "reason": record.reason,
        "attempt_count": len(record.attempts),
        "attempts": [
            {
                "worker": a.worker.hex(),
                "dispatched_after": a.dispatched_after,
                "failed_after": a.failed_after,
                "reason": a.reason,
            }
            for a in record.attempts
        ],
        "first_failure": _when(record.first_failure_ns),
        "last_failure": _when(record.last_failure_ns),
        "first_failure_ns": record.first_failure_ns,
        "last_failure_ns": record.last_failure_ns,
        "priority": record.priority,
        "queue": record.queue,
        "frames": len(record.frames),
        "bytes": sum(len(f) for f in record.frames),
    }


def run_dead(args: argparse.Namespace) -> int:
    path = os.path.abspath(args.path)
    with _reader(path) as (conn, _in_use):
        rows = conn.execute(
            f"SELECT {DEAD_COLUMNS} FROM dead ORDER BY seq LIMIT ?",
            (-1 if args.limit is None else args.limit,),
        ).fetchall()
        records = [dead_from_row(path, row) for row in rows]
    if args.json:
        for record in records:
            print(json.dumps(_dead_json(record)))
        return 0
    if not records:
        print(f"no dead letters in {path}")
        return 0
    print("| seq | message id | reason | attempts | first failure | last failure | bytes |")
    print("|---|---|---|---|---|---|---|")
    for r in records:
        history = "; ".join(f"{a.worker.hex() or '-'}: {a.reason}" for a in r.attempts)
        attempts = f"{len(r.attempts)}" + (f" ({history})" if history else "")
        print(
            f"| {r.seq} | {r.message_id.hex() or '-'} | {r.reason} | {attempts} "
            f"| {_when(r.first_failure_ns)} | {_when(r.last_failure_ns)} "
            f"| {sum(len(f) for f in r.frames):,} |"
        )
    return 0


# ------------------------------------------------------------------ writing
def _open_writer(path: str) -> Spool:
    _check_path(path)
    return Spool(path)


def run_replay(args: argparse.Namespace) -> int:
    path = os.path.abspath(args.path)
    with _open_writer(path) as spool:
        if args.all:
            n = spool.replay()
            print(f"replayed {n:,} dead letter(s) to pending in {path}")
            return 0
        wanted = sorted(set(args.ids))
        known = {r.seq for r in spool.dead_letters()}
        missing = [seq for seq in wanted if seq not in known]
        n = spool.replay([seq for seq in wanted if seq in known])
    print(f"replayed {n:,} dead letter(s) to pending in {path}")
    if missing:
        listed = ", ".join(map(str, missing))
        print(f"zmqmesh spool: no dead letter with seq {listed} in {path}", file=sys.stderr)
        return 1
    return 0


def run_purge(args: argparse.Namespace) -> int:
    path = os.path.abspath(args.path)
    with _open_writer(path) as spool:
        n = spool.purge_dead(None if not args.ids else sorted(set(args.ids)))
    print(f"purged {n:,} dead letter(s) from {path}")
    return 0
