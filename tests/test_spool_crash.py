"""The spool under kill -9, a read-only file system and a full disk."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import selectors
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from zmqmesh import Spool, SpoolError

# The producer: appends numbered messages through the spool and prints each
# number once `append`/`append_many` has returned (= acknowledged to it). On
# restart it continues after the last message the spool holds.
PRODUCER = r"""
import hashlib, sys
from zmqmesh import Spool

def message(n):
    body = hashlib.blake2b(n.to_bytes(8, "big")).digest() * (1 + n % 9)
    return [n.to_bytes(8, "big"), body] if n % 3 else [n.to_bytes(8, "big") + body]

path, policy = sys.argv[1], sys.argv[2]
spool = Spool(path, fsync=policy, batch_max=64)
n = 0
for entry in spool.iter_pending():
    n = int.from_bytes(entry.frames[0][:8], "big") + 1
out = sys.stdout
while True:
    if n % 4 == 0:
        k = 1 + n % 11
        spool.append_many([message(i) for i in range(n, n + k)])
        out.write("".join(f"{i}\n" for i in range(n, n + k)))
        n += k
    else:
        spool.append(message(n), message_id=n.to_bytes(8, "big"))
        out.write(f"{n}\n")
        n += 1
    out.flush()
"""


def expected(n: int) -> list[bytes]:
    body = hashlib.blake2b(n.to_bytes(8, "big")).digest() * (1 + n % 9)
    return [n.to_bytes(8, "big"), body] if n % 3 else [n.to_bytes(8, "big") + body]


class Lines:
    """Complete lines from a child's stdout, read with a deadline (no sleeping)."""

    def __init__(self, proc: subprocess.Popen[bytes], errors: Path) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.errors = errors
        self.fd = proc.stdout.fileno()
        self.buf = b""
        self.lines: list[int] = []
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.fd, selectors.EVENT_READ)

    def _read(self, timeout: float) -> bool:
        if not self.sel.select(timeout):
            return True
        chunk = os.read(self.fd, 65536)
        if not chunk:
            return False
        self.buf += chunk
        *done, self.buf = self.buf.split(b"\n")
        self.lines.extend(int(x) for x in done)
        return True

    def wait_for(self, count: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.lines) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.proc.poll() is not None:
                tail = self.errors.read_text(errors="replace")[-2000:]
                raise AssertionError(
                    f"producer gave {len(self.lines)} of {count} lines; its stderr:\n{tail}"
                )
            self._read(min(remaining, 0.5))

    def drain(self) -> None:
        """After the kill: every complete line that made it into the pipe."""
        while self._read(5.0):
            pass
        self.sel.close()


@pytest.mark.timeout(90)
def test_kill_9_at_30_random_moments_loses_nothing_acknowledged(tmp_path):
    path = tmp_path / "crash.spool"
    script = tmp_path / "producer.py"
    script.write_text(PRODUCER)
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    acknowledged: set[int] = set()
    kills_during_open = 0
    for round_ in range(30):
        policy = rng.choice(["always", "batch", "off"])
        # The random moment: after a random number of acknowledged appends
        # (0 = while the process is still starting and opening the spool).
        target = 0 if rng.random() < 0.1 else rng.randint(1, 600)
        errors = tmp_path / "producer.err"
        with open(errors, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, str(script), str(path), policy], stdout=subprocess.PIPE, stderr=err
            )
        lines = Lines(proc, errors)
        try:
            lines.wait_for(target)
        finally:
            proc.kill()
            proc.wait()
        lines.drain()
        assert proc.stdout is not None
        proc.stdout.close()
        kills_during_open += target == 0
        assert lines.lines == sorted(lines.lines), "the producer acknowledged out of order"
        acknowledged.update(lines.lines)

        with Spool(path) as spool:
            numbers = []
            for entry in spool.iter_pending():
                n = int.from_bytes(entry.frames[0][:8], "big")
                assert entry.frames == expected(n), f"round {round_}: message {n} is not whole"
                numbers.append(n)
            stats = spool.stats()
        context = f"round {round_} (seed {seed}, policy {policy}, target {target})"
        # Present exactly once and in order: 0..k without a gap or a duplicate.
        assert numbers == list(range(len(numbers))), context
        missing = acknowledged - set(numbers)
        assert not missing, f"{context}: acknowledged but lost: {sorted(missing)[:10]}"
        assert stats.pending == len(numbers), context
    assert len(acknowledged) > 1000


# ------------------------------------------------------------- file systems
@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tiny tmpfs mounted at `where` (skip where mounting is not permitted)."""
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def remount(where: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(where)], check=True)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.timeout(30)
def test_read_only_file_system_gives_spool_error_and_keeps_everything(tmp_path):
    with tmpfs(tmp_path / "mnt", "4m") as mnt:
        path = mnt / "s.spool"
        with Spool(path, fsync="always") as spool:
            seqs = spool.append_many([f"m{i}".encode() for i in range(100)])
        before = digest(path)
        remount(mnt, "ro")
        with pytest.raises(SpoolError) as err:
            Spool(path)
        assert str(path) in str(err.value) and "not writable" in str(err.value)
        with pytest.raises(SpoolError) as err:
            Spool(mnt / "new.spool")
        assert str(mnt / "new.spool") in str(err.value)
        assert digest(path) == before
        remount(mnt, "rw")
        with Spool(path) as spool:
            assert [e.seq for e in spool.iter_pending()] == seqs


@pytest.mark.timeout(60)
@pytest.mark.parametrize("policy", ["always", "batch"])
def test_full_disk_gives_spool_error_and_loses_nothing_acknowledged(tmp_path, policy):
    with tmpfs(tmp_path / "mnt", "1m") as mnt:
        path = mnt / "s.spool"
        acknowledged: dict[int, bytes] = {}
        spool = Spool(path, fsync=policy)
        try:
            with pytest.raises(SpoolError) as err:
                for _ in range(10_000):
                    body = os.urandom(1500)
                    acknowledged[spool.append(body)] = body
            assert str(path) in str(err.value) and "disk is full" in str(err.value)
            assert acknowledged, "nothing fitted at all"
            assert spool.metrics.get("spool_errors") >= 1
            # Room again (a bigger file system): the same open spool goes on.
            remount(mnt, "size=16m")
            seq = spool.append(b"after the disk was freed")
            acknowledged[seq] = b"after the disk was freed"
        finally:
            spool.close()
        with Spool(path) as spool:
            stored = {e.seq: e.payload for e in spool.iter_pending()}
        assert stored == acknowledged
