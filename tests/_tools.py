"""Test helpers: `python -m zmqmesh ARGS` as a child whose output a test reads line
by line, and a fixed TCP port that no other test's socket can take."""

from __future__ import annotations

import queue
import random
import socket
import subprocess
import sys
import threading
from typing import IO, Any

from zmqmesh.testing import wait_until

__all__ = ["Tool", "fixed_port"]


def fixed_port() -> int:
    """A free 127.0.0.1 port below the kernel's ephemeral range, for a test that must rebind it.

    A port the kernel hands out (bind to 0, as `tcp://127.0.0.1:*` does)
    comes from the ephemeral range, which every connecting socket draws from
    too: under a busy suite another test's connection can take it before a
    restarted process binds it again. Below that range only explicit binds
    take ports, and no test binds a fixed one but through here.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(100):
        port = random.randrange(max(1024, low - 12_000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port below the ephemeral range (from {low})")


class Tool:
    """`python -m zmqmesh ARGS`: stdout lines on a queue, stderr lines in a list."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "zmqmesh", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.out: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.err: list[str] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._threads = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out.put)),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.err.append)),
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _read(stream: IO[str], put: Any) -> None:
        for line in stream:
            put(line.rstrip("\n"))

    @property
    def stderr(self) -> str:
        return "\n".join(self.err)

    def line(self, timeout: float = 15.0) -> str:
        """The next stdout line; AssertionError (with stderr) when none comes in time."""
        try:
            return self.out.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output in {timeout} s; stderr: {self.stderr}") from None

    def wait_err(self, needle: str | tuple[str, ...], timeout: float = 15.0) -> None:
        """Wait for `needle` (or any of several) on stderr."""
        needles = (needle,) if isinstance(needle, str) else needle
        wait_until(
            lambda: any(n in self.stderr for n in needles), timeout, what=f"{needles!r} on stderr"
        )

    def wait(self, timeout: float = 30.0) -> int:
        """The exit code, once the child has exited and its output is all read."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running; stderr: {self.stderr}") from None
        for t in self._threads:
            t.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for t in self._threads:
            t.join(5)
