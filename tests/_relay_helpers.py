"""A relay node as a real subprocess, read line by line with deadlines (for the relay tests)."""

from __future__ import annotations

import json
import pathlib
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import IO

READY_TIMEOUT = 20.0


class RelayProcess:
    """`python -m zmqmesh relay CONFIG` with its stdout and stderr read on threads."""

    def __init__(self, config: pathlib.Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "zmqmesh", "relay", str(config), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout, True)),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr, False)),
        ]
        for t in self._readers:
            t.start()
        self.endpoints: dict[str, dict[str, str]] = {}
        self.control = ""
        self.metrics_url = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self, stream: IO[str] | None, into: list[str], feed: bool) -> None:
        assert stream is not None
        for line in stream:
            into.append(line.rstrip("\n"))
            if feed:
                self.lines.put(line.rstrip("\n"))
        if feed:
            self.lines.put(None)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> RelayProcess:
        """Read the endpoint lines up to `ready NODE`."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(0.01, left))
            except queue.Empty:
                raise AssertionError(f"relay not ready in {timeout} s: {self.stderr}") from None
            if line is None:
                raise AssertionError(f"relay exited before ready: {self.stderr}")
            kind, _, rest = line.partition(" ")
            if kind == "ready":
                return self
            if kind == "control":
                self.control = rest
            elif kind == "metrics":
                self.metrics_url = rest
            else:
                name, _, eps = rest.partition(" ")
                self.endpoints[name] = dict(e.split("=", 1) for e in eps.split())

    def terminate(self, timeout: float = 30.0, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.wait(timeout)

    def wait(self, timeout: float = 30.0) -> int:
        rc = self.proc.wait(timeout)
        for t in self._readers:
            t.join(5)
        return rc

    def final(self) -> dict[str, dict[str, float]]:
        """The `final {json}` line printed after the drain."""
        for line in self.stdout:
            if line.startswith("final "):
                result: dict[str, dict[str, float]] = json.loads(line[6:])
                return result
        raise AssertionError(f"no final line in {self.stdout}; stderr {self.stderr}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for t in self._readers:
            t.join(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def rss_kb(pid: int) -> int:
    """VmRSS of a process in kB, from /proc/PID/status."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")
