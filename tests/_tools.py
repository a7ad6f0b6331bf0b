"""`python -m zmqmesh ARGS` as a child process whose output a test reads line by line."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
from typing import IO, Any

from zmqmesh.testing import wait_until

__all__ = ["Tool"]


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
