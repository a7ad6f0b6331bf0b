"""The stage crew of `zmqmesh demo`: narration, waits, child processes, the relay.

`demo.py` tells the story; this module owns everything that must be started
and, above all, stopped again: child processes (killed by process group, so a
worker's command dies with it), the relay node (`zmqmesh relay` as a
subprocess, or its `RelayNode` in this process), the worker-killing thread,
a TCP tap, and the probes the tour needs (does multicast work on loopback?).
Nothing here sleeps to synchronise: every wait is a condition polled
against a deadline.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Final, Protocol, TypeVar

import zmq

from .._config import RelayConfig
from .._errors import MeshError, Timeout
from ._signals import on_sigterm

if TYPE_CHECKING:
    from discovery import Discovery, Peer
    from patterns.pubsub import Publisher, Subscriber

__all__ = [
    "Children",
    "InProcessRelay",
    "Narrator",
    "Relay",
    "Saboteur",
    "SubprocessRelay",
    "WireTap",
    "drain_to_marker",
    "find_by_name",
    "format_metrics",
    "interrupt_on_sigterm",
    "loopback_multicast_works",
    "pick_endpoint",
    "relay_config",
    "term_context",
    "wait_for",
    "write_job_script",
]

T = TypeVar("T")

_POLL: Final = 0.01  # how often a wait looks at its condition again
_MULTICAST_GROUP: Final = "239.255.77.78"  # administratively scoped (RFC 2365), unused by mDNS


class Narrator:
    """Short plain lines, numbered steps, and the time since the start on each step."""

    def __init__(self, out: IO[str] | None = None) -> None:
        self._out = out or sys.stdout
        self._t0 = time.monotonic()
        self._step = 0

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def _print(self, text: str) -> None:
        print(text, file=self._out, flush=True)

    def title(self, text: str) -> None:
        self._print(text)

    def step(self, title: str) -> None:
        self._step += 1
        self._print(f"\n{self._step}. {title}  [{self.elapsed:.1f} s]")

    def say(self, text: str) -> None:
        """What happens and why, as a guide would put it."""
        self._print(f"   {text}")

    def saw(self, text: str) -> None:
        """What was observed."""
        self._print(f"   -> {text}")

    def lines(self, rows: Sequence[str]) -> None:
        for row in rows:
            self._print(f"      {row}")


def wait_for(condition: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll `condition` until it returns something truthy; `Timeout` naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise Timeout(f"{what} did not happen within {timeout:g} s")
        # A pause between looks at a condition that has a deadline, not a
        # synchronising sleep: the condition decides when the demo goes on.
        time.sleep(_POLL)


def loopback_multicast_works(timeout: float = 0.5) -> bool:
    """Whether a multicast datagram sent out of 127.0.0.1 comes back (mDNS needs that).

    Linux loops multicast back to local members even when `lo` lacks the
    MULTICAST flag; some systems and containers do not, and only root can
    change that (`ip link set lo multicast on`), which the demo never asks for.
    """
    recv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    send = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        recv.bind(("", 0))
        port = recv.getsockname()[1]
        membership = socket.inet_aton(_MULTICAST_GROUP) + socket.inet_aton("127.0.0.1")
        recv.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
        send.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
        send.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        token = os.urandom(8)
        send.sendto(token, (_MULTICAST_GROUP, port))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            recv.settimeout(left)
            data, _ = recv.recvfrom(64)
            if data == token:
                return True
        return False
    except OSError:  # includes socket.timeout
        return False
    finally:
        recv.close()
        send.close()


class Children:
    """Child processes, each in its own process group, all gone when `close()` returns.

    A worker running `-- CMD` has children of its own; SIGKILL to the group
    takes them along, which SIGKILL to the worker alone would not.
    """

    def __init__(self, logdir: Path) -> None:
        self._logdir = logdir
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._pending: dict[str, bytearray] = {}  # stdout read but not yet returned

    def spawn(self, name: str, argv: Sequence[str], *, stdout_pipe: bool = False) -> int:
        """Start `argv`; stderr (and stdout unless piped) go to LOGDIR/NAME.log. Its pid."""
        log = open(self._logdir / f"{name}.log", "wb")  # noqa: SIM115 - the child holds it
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else log,
                stderr=log,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        finally:
            log.close()
        self._procs[name] = proc
        return proc.pid

    def log_tail(self, name: str, lines: int = 5) -> str:
        try:
            text = (self._logdir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return " / ".join(text.strip().splitlines()[-lines:])

    def check_alive(self, name: str) -> None:
        proc = self._procs[name]
        if proc.poll() is not None:
            tail = self.log_tail(name)
            raise MeshError(
                f"{name} (pid {proc.pid}) exited with status {proc.returncode}"
                + (f": {tail}" if tail else "")
            )

    def read_line(self, name: str, timeout: float, what: str) -> str:
        """The next line `name` prints on stdout (spawned with `stdout_pipe`).

        Reads the pipe's file descriptor itself: a buffered `readline` may take
        several lines at once, and select() would then wait for more while the
        next line sits in the buffer.
        """
        proc = self._procs[name]
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        buf = self._pending.setdefault(name, bytearray())
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Timeout(f"{what} did not happen within {timeout:g} s")
                if sel.select(left):
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        self.check_alive(name)
                        raise MeshError(f"{name} closed its output before {what}")
                    buf += chunk
        line, _, rest = bytes(buf).partition(b"\n")
        buf[:] = rest
        return line.decode(errors="replace")

    def kill(self, name: str) -> None:
        """SIGKILL the process group of `name` and reap it."""
        proc = self._procs[name]
        if proc.poll() is None:  # once reaped, its pid (and group id) may be another's
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop(self, name: str, grace: float) -> int | None:
        """SIGTERM, then SIGKILL after `grace` s; the exit status (None if it was killed)."""
        proc = self._procs[name]
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.kill(name)
                return None
        return proc.returncode

    def close(self, grace: float = 3.0) -> None:
        """Stop every child still running (SIGTERM, then SIGKILL) and close their pipes."""
        for name in list(self._procs):
            self.stop(name, grace)
            proc = self._procs.pop(name)
            if proc.stdout is not None:
                proc.stdout.close()


class Saboteur:
    """A thread that SIGKILLs whichever child first leaves `MARKS/NAME.busy` (the job script).

    Then it creates `MARKS/go`, which lets the job finish on the worker it is
    re-dispatched to. `with Saboteur(...) as s:` runs it while the body makes
    the request the victim will hold; leaving the block stands it down and
    joins it; `s.victim` then names the child killed (or raises why none was).
    """

    def __init__(
        self, children: Children, names: Sequence[str], marks: Path, *, timeout: float
    ) -> None:
        self._children = children
        self._names = tuple(names)
        self._marks = marks
        self._timeout = timeout
        self._cancel = threading.Event()
        self._victim = ""
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="zmqmesh-demo-saboteur")

    def _holders(self) -> list[str]:
        if self._cancel.is_set():
            raise MeshError("the long job ended before any worker was seen starting it")
        return [n for n in self._names if (self._marks / f"{n}.busy").exists()]

    def _run(self) -> None:
        try:
            busy = wait_for(self._holders, self._timeout, "a worker starting the long job")
            self._children.kill(busy[0])
            self._victim = busy[0]
            (self._marks / "go").touch()
        except BaseException as exc:
            self._error = exc

    def __enter__(self) -> Saboteur:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._cancel.set()
        self._thread.join()

    @property
    def victim(self) -> str:
        if self._error is not None:
            raise self._error
        return self._victim


class WireTap:
    """A TCP pass-through on 127.0.0.1 that keeps a copy of every byte (a wiretap).

    Connect to `endpoint` instead of `target`: each connection is relayed to
    the target byte for byte, both ways, so ZeroMQ (and CURVE) neither notice
    nor care; `seen` holds what went through. One thread, woken by a
    socketpair on `close()`, owns every socket.
    """

    def __init__(self, target: str) -> None:
        host, _, port = target.removeprefix("tcp://").rpartition(":")
        self._target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"tcp://127.0.0.1:{self._listener.getsockname()[1]}"
        self._wake_r, self._wake_w = socket.socketpair()
        self._seen = bytearray()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="zmqmesh-demo-tap", daemon=True)
        self._thread.start()

    @property
    def seen(self) -> bytes:
        with self._lock:
            return bytes(self._seen)

    def _run(self) -> None:
        peers: dict[socket.socket, socket.socket] = {}
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            try:
                while True:
                    for key, _ in sel.select():
                        sock = key.fileobj
                        if sock is self._wake_r:
                            return
                        if sock is self._listener:
                            inside, _ = self._listener.accept()
                            try:
                                outside = socket.create_connection(self._target, timeout=5)
                            except OSError:  # the target is gone: the client sees a close
                                inside.close()
                                continue
                            peers[inside], peers[outside] = outside, inside
                            sel.register(inside, selectors.EVENT_READ)
                            sel.register(outside, selectors.EVENT_READ)
                            continue
                        assert isinstance(sock, socket.socket)
                        try:
                            data = sock.recv(65536)
                        except OSError:
                            data = b""
                        other = peers.get(sock)
                        if data and other is not None:
                            with self._lock:
                                self._seen += data
                            other.sendall(data)
                        elif other is not None:  # one side closed: close both
                            for s in (sock, other):
                                sel.unregister(s)
                                peers.pop(s, None)
                                s.close()
            finally:
                for s in peers:
                    s.close()

    def close(self) -> None:
        self._wake_w.send(b"x")
        self._thread.join()
        for s in (self._listener, self._wake_r, self._wake_w):
            s.close()


class Relay(Protocol):
    """What the tour needs of a relay node, however it runs."""

    how: str  # one line for the narration: where it runs
    queue_frontend: str
    queue_backend: str
    forwarder_frontend: str
    forwarder_backend: str
    exit_status: int | None  # after close(): 0 when it drained and stopped cleanly
    stats_from: str  # where stats() reads, for the narration

    def stats(self) -> dict[str, dict[str, float]]:
        """Every component's counters and gauges, by component name."""
        ...

    def close(self) -> None: ...


class SubprocessRelay:
    """`zmqmesh relay CONFIG.toml` as a child process, read through its printed endpoints.

    The relay prints one line per component (`queue jobs frontend=EP
    backend=EP`), `control EP`, then `ready NODE`; its stats come from the
    control socket, as `zmqmesh stats` gets them; SIGTERM makes it drain and
    exit 0.
    """

    def __init__(
        self,
        children: Children,
        config: Path,
        *,
        ctx: zmq.Context[zmq.Socket[bytes]],
        timeout: float,
    ) -> None:
        self._children = children
        self._ctx = ctx
        argv = [sys.executable, "-m", "zmqmesh", "relay", str(config)]
        self.pid = children.spawn("relay", argv, stdout_pipe=True)
        self.how = f"as a subprocess: zmqmesh relay {config.name} (pid {self.pid})"
        self.exit_status: int | None = None
        bound: dict[str, dict[str, str]] = {}
        control = ""
        try:
            while True:
                line = children.read_line("relay", timeout, "the relay printing its endpoints")
                kind, _, rest = line.partition(" ")
                if kind == "ready":
                    break
                if kind == "control":
                    control = rest.strip()
                elif kind in ("forwarder", "queue"):
                    _, *pairs = rest.split()
                    bound[kind] = dict(pair.partition("=")[::2] for pair in pairs)
            self.control = control
            self.stats_from = f"its control socket {control} (what `zmqmesh stats` prints)"
            self.forwarder_frontend = bound["forwarder"]["frontend"]
            self.forwarder_backend = bound["forwarder"]["backend"]
            self.queue_frontend = bound["queue"]["frontend"]
            self.queue_backend = bound["queue"]["backend"]
        except KeyError as exc:
            self.close()
            raise MeshError(f"the relay did not print its {exc.args[0]} endpoints") from None
        except BaseException:
            self.close()
            raise
        if not control:
            self.close()
            raise MeshError("the relay did not print its control endpoint")

    def stats(self) -> dict[str, dict[str, float]]:
        from ._control import fetch_stats

        return fetch_stats(self.control, 2.0, ctx=self._ctx)

    def close(self) -> None:
        if self.exit_status is None:
            self.exit_status = self._children.stop("relay", grace=5.0)


class InProcessRelay:
    """The same relay (`RelayNode`, what `zmqmesh relay` runs) on threads of this process."""

    def __init__(self, config: RelayConfig, source: Path) -> None:
        from ._relay_node import RelayNode

        self._node = RelayNode(config, str(source)).start()
        self.how = "in this process (RelayNode: the forwarder and the queue on threads)"
        self.exit_status: int | None = None
        self.stats_from = "RelayNode.metrics() (what its control socket would send)"
        eps = self._node.endpoints
        fwd, queue = eps[config.forwarder[0].name], eps[config.queue[0].name]
        self.forwarder_frontend, self.forwarder_backend = fwd["frontend"], fwd["backend"]
        self.queue_frontend, self.queue_backend = queue["frontend"], queue["backend"]

    def stats(self) -> dict[str, dict[str, float]]:
        return {m.component: m.snapshot() for m in self._node.metrics()}

    def close(self) -> None:
        if self.exit_status is None:
            self._node.drain(1.0)
            self._node.close()
            self.exit_status = 0


def relay_config(
    *, node: str, jobs: str | None, ticks: str | None, heartbeat: float, liveness: int
) -> str:
    """The tour's relay config (TOML); `jobs` / `ticks` are the service names to announce."""
    announce_jobs = f'announce = "{jobs}"\n' if jobs else ""
    announce_ticks = f'announce = "{ticks}"\n' if ticks else ""
    any_port = '"tcp://127.0.0.1:*"'
    return (
        "# Written by `zmqmesh demo`: the relay of the tour.\n"
        f'[node]\nname = "{node}"\ncontrol = {any_port}\n'
        'interfaces = ["127.0.0.1"]\ngrace = 1.0\n\n'
        f'[[forwarder]]\nname = "ticks"\nfrontend = {any_port}\nbackend = {any_port}\n'
        f"{announce_ticks}\n"
        f'[[queue]]\nname = "jobs"\nfrontend = {any_port}\nbackend = {any_port}\n'
        f"heartbeat = {heartbeat}\nliveness = {liveness}\nmax_attempts = 3\n{announce_jobs}"
    )


def find_by_name(
    disc: Discovery, service: str, roles: Sequence[str], *, timeout: float
) -> list[Peer]:
    """The peers of `service`, once one of each of `roles` is in the browser's table.

    Unlike `resolve`, which listens a little longer after the first answer
    (responders may answer late), this returns the moment all are known;
    `DiscoveryError` after `timeout` s.
    """
    wanted = set(roles)
    with disc.browse(service=service, role=tuple(roles)) as browser:
        found = browser.wait_for(
            lambda peers: {p.role for p in peers.values()} >= wanted,
            timeout,
            f"one each of {', '.join(roles)} for {service}",
        ).values()
    return sorted(found, key=lambda p: p.role)


def pick_endpoint(peers: Sequence[Peer], role: str, socket_type: str) -> str:
    """The endpoint of the first peer with `role` and `socket_type`."""
    for p in peers:
        if p.role == role and p.socket_type == socket_type:
            return p.endpoint
    raise MeshError(f"mDNS found no {role} endpoint of socket type {socket_type}")


def drain_to_marker(pub: Publisher, sub: Subscriber, topic: str, *, timeout: float) -> int:
    """Read `sub` up to a last message "end" on `topic` (sent again while a pipe drops it).

    The marker goes on the same topic as the burst before it: a hole in a
    topic's numbers shows only when a later message of that topic arrives.
    Returns how many messages came before the marker.
    """
    received = 0
    pub.publish(topic, b"end")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = sub.recv(timeout=0.5)
        except Timeout:
            pub.publish(topic, b"end")  # the last one was dropped too
            continue
        if msg.body == b"end":
            return received
        received += 1
    raise MeshError(f"subscriber {sub.name} did not catch up within {timeout:g} s")


def term_context(ctx: zmq.Context[zmq.Socket[bytes]], timeout: float = 5.0) -> None:
    """Terminate the context; a socket left open is a bug, reported instead of hanging."""
    done = threading.Event()

    def term() -> None:
        ctx.term()
        done.set()

    t = threading.Thread(target=term, name="zmqmesh-demo-term", daemon=True)
    t.start()
    t.join(timeout)
    if not done.is_set():
        print("zmqmesh demo: a socket was left open (a bug); exiting anyway", file=sys.stderr)


_JOB_SCRIPT: Final = """\
# One demo job: the request body on stdin, the reply on stdout.
# Usage: sh job.sh WORKER-NAME MARK-DIR. A body starting with "long" first
# leaves MARK-DIR/WORKER-NAME.busy, so the demo knows who holds it, and then
# works until MARK-DIR/go exists (5 s at most), so it cannot end before the
# demo has killed that worker.
name=$1 marks=$2
body=$(cat)
case $body in
  long*)
    : > "$marks/$name.busy"
    n=0
    while [ ! -e "$marks/go" ] && [ $n -lt 250 ]; do sleep 0.02; n=$((n + 1)); done ;;
esac
printf '%s -> done by %s' "$body" "$name"
"""


def write_job_script(directory: Path) -> Path:
    """The command the demo workers run per request (`zmqmesh worker -- sh job.sh NAME DIR`)."""
    path = directory / "job.sh"
    path.write_text(_JOB_SCRIPT)
    return path


def format_metrics(
    stats: Mapping[str, Mapping[str, float]], *, skip: Sequence[str] = ("_sum", "_count")
) -> list[str]:
    """The rows `zmqmesh stats` prints, of the non-zero values only (sums and counts left out)."""
    from .stats import format_table

    shown = {
        component: {k: v for k, v in values.items() if v and not k.endswith(tuple(skip))}
        for component, values in stats.items()
    }
    return format_table(shown).splitlines()


def _interrupt() -> None:
    raise KeyboardInterrupt


def interrupt_on_sigterm() -> contextlib.AbstractContextManager[None]:
    """SIGTERM unwinds like Ctrl-C, so every child and socket is still cleaned up."""
    return on_sigterm(_interrupt)
