"""The two ZAP authenticators (RFC 27) and `guard_server`, which shares one per context.

`Authenticator` runs pyzmq's ThreadAuthenticator (a thread that also reads
the guarded sockets' monitors); `AsyncAuthenticator` runs pyzmq's
AsyncioAuthenticator and the monitor readers as tasks on the running loop.
What they share (domains, allow-list checks, refusal logs, the per-context
registry) is in `_zap.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
from typing import Any

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.auth.base import Authenticator as _ZmqAuthenticator
from zmq.auth.thread import AuthenticationThread, ThreadAuthenticator

from ._errors import LocalProtocolError, TransportError
from ._metrics import Metrics
from ._sockets import CurveOptions
from ._zap import (
    ZapGuard,
    _claim,
    _key,
    _registry,
    _registry_lock,
    _release,
    _UnbindFirst,
    _unclaim,
    _ZapBase,
)

__all__ = ["AsyncAuthenticator", "Authenticator", "guard_server"]

log = logging.getLogger("zmqmesh.security")
_pipe_ids = itertools.count(1)


# ---------------------------------------------------------------- blocking


class _ZapThread(AuthenticationThread):
    """pyzmq's ZAP thread, also reading the monitors of the guarded sockets."""

    def __init__(self, authenticator: _ThreadZap, pipe: zmq.Socket[bytes]) -> None:
        super().__init__(authenticator, pipe)
        self.name = "zmqmesh-zap"
        self._owner = authenticator.owner
        self._monitors: dict[zmq.Socket[bytes], ZapGuard] = {}

    async def _run(self) -> None:
        poller = self.poller = zmq.asyncio.Poller()
        zap = self.authenticator.zap_socket
        poller.register(self.pipe, zmq.POLLIN)
        poller.register(zap, zmq.POLLIN)
        self.started.set()
        try:
            while True:
                events = dict(await poller.poll())
                if self.pipe in events and self._handle_pipe_message(self.pipe.recv_multipart()):
                    return
                if zap in events:
                    await self.authenticator.handle_zap_message(zap.recv_multipart())
                for mon in [m for m in self._monitors if m in events]:
                    self._drain(mon)
        finally:
            for mon in self._monitors:
                mon.close(linger=0)
            self._monitors.clear()

    def _handle_pipe_message(self, msg: list[bytes]) -> bool:
        if msg[0] == b"TERMINATE":
            return True
        if msg[0] == b"WATCH" and len(msg) == 3:
            guard = self._owner._guards.get(msg[2].decode())
            mon = self.authenticator.context.socket(zmq.PAIR, socket_class=zmq.Socket)
            try:
                mon.linger = 0
                mon.connect(msg[1].decode())
            except zmq.ZMQError as exc:
                mon.close(linger=0)
                self.pipe.send_multipart([b"ERROR", str(exc).encode()])
                return False
            if guard is not None:
                self._monitors[mon] = guard
                assert self.poller is not None
                self.poller.register(mon, zmq.POLLIN)
            else:
                mon.close(linger=0)
            self.pipe.send(b"OK")
            return False
        if msg[0] == b"UNWATCH" and len(msg) == 2:
            domain = msg[1].decode()
            for mon in [m for m, g in self._monitors.items() if g.domain == domain]:
                self._forget(mon)
            self.pipe.send(b"OK")
            return False
        self.pipe.send_multipart([b"ERROR", b"unknown command " + msg[0][:32]])
        return False

    def _drain(self, mon: zmq.Socket[bytes]) -> None:
        guard = self._monitors[mon]
        while True:
            try:
                frames = mon.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if self._owner._on_event(guard, frames):
                self._forget(mon)
                return

    def _forget(self, mon: zmq.Socket[bytes]) -> None:
        assert self.poller is not None
        self.poller.unregister(mon)
        mon.close(linger=0)
        del self._monitors[mon]


class _ThreadZap(ThreadAuthenticator, _UnbindFirst):
    """ThreadAuthenticator with our thread, and a lock on the command pipe."""

    def __init__(self, owner: Authenticator) -> None:
        super().__init__(context=owner.ctx, log=logging.getLogger("zmqmesh.security.zap"))
        self.owner = owner
        self.pipe_lock = threading.Lock()
        # pyzmq names it after id(self), which a quick restart may reuse while
        # the old endpoint is not yet released.
        self.pipe_endpoint = f"inproc://zmqmesh.zap-pipe.{next(_pipe_ids)}"

    def start(self) -> None:
        # ThreadAuthenticator.start with our thread class; the ZAP socket first.
        # On failure the caller's stop() closes what was opened.
        _ZmqAuthenticator.start(self)
        self.pipe = self.context.socket(zmq.PAIR, socket_class=zmq.Socket)
        self.pipe.linger = 1
        self.pipe.bind(self.pipe_endpoint)
        thread_pipe = self.context.socket(zmq.PAIR, socket_class=zmq.Socket)
        try:
            thread_pipe.linger = 1
            thread_pipe.connect(self.pipe_endpoint)
            self.thread = _ZapThread(self, thread_pipe)
            self.thread.start()
        except BaseException:
            thread_pipe.close(linger=0)
            raise
        if not self.thread.started.wait(timeout=10):
            raise TransportError("the ZAP authenticator thread did not start within 10 s")

    def stop(self) -> None:
        # The pipe may be used from any thread that owns a guard: serialise.
        with self.pipe_lock:
            super().stop()

    def call(self, *frames: bytes) -> None:
        with self.pipe_lock:
            if self.pipe is None:
                raise LocalProtocolError("the ZAP authenticator is stopped")
            self.pipe.send_multipart(list(frames))
            if not self.pipe.poll(10_000):
                raise TransportError("the ZAP authenticator thread did not answer within 10 s")
            reply = self.pipe.recv_multipart()
        if reply[0] != b"OK":
            raise TransportError(f"ZAP authenticator: {b' '.join(reply[1:]).decode()}")

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self.owner._before_zap(msg)
        try:
            await super().handle_zap_message(msg)
        except Exception:  # a bug here must not kill the handler of every socket
            log.exception("ZAP request from %s could not be handled", self.owner._address)


class Authenticator(_ZapBase):
    """The ZAP handler of one `zmq.Context`, in a background thread.

    Usually started for you by `guard_server`. Start it yourself to keep one
    running across servers; `guard_server` then shares it and never stops it.
    """

    def __init__(self, ctx: zmq.Context[Any] | None = None, *, metrics: Metrics | None = None):
        super().__init__(ctx, metrics)

    def start(self) -> Authenticator:
        with _registry_lock:
            _claim(self)
            try:
                self._start_zap(_ThreadZap(self))
            except BaseException:
                _unclaim(self)
                raise
        return self

    def stop(self) -> None:
        """Stop the thread and close its sockets; sockets with an allow-list then
        refuse every client (fail closed) until guarded again."""
        with _registry_lock:
            _unclaim(self)
            zap, self._zap = self._zap, None
            self._detach_all()
        if zap is not None:
            zap.stop()

    def _watch(self, address: str, guard: ZapGuard) -> None:
        assert isinstance(self._zap, _ThreadZap)
        self._zap.call(b"WATCH", address.encode(), guard.domain.encode())

    def _unwatch(self, guard: ZapGuard) -> None:
        zap = self._zap
        if isinstance(zap, _ThreadZap):
            with contextlib.suppress(LocalProtocolError):  # stopped meanwhile
                zap.call(b"UNWATCH", guard.domain.encode())

    def __enter__(self) -> Authenticator:
        return self if self.running else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------- asyncio


class _AsyncZap(AsyncioAuthenticator, _UnbindFirst):
    def __init__(self, owner: AsyncAuthenticator) -> None:
        super().__init__(context=owner.ctx, log=logging.getLogger("zmqmesh.security.zap"))
        self.owner = owner

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self.owner._before_zap(msg)
        try:
            await super().handle_zap_message(msg)
        except Exception:  # a bug here must not kill the handler of every socket
            log.exception("ZAP request from %s could not be handled", self.owner._address)


class AsyncAuthenticator(_ZapBase):
    """The ZAP handler of one context as tasks on the running event loop (no thread)."""

    def __init__(self, ctx: zmq.Context[Any] | None = None, *, metrics: Metrics | None = None):
        super().__init__(ctx, metrics)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: dict[str, tuple[asyncio.Task[None], zmq.asyncio.Socket]] = {}

    def start(self) -> AsyncAuthenticator:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise LocalProtocolError(
                "AsyncAuthenticator.start() needs a running event loop"
            ) from None
        with _registry_lock:
            _claim(self)
            try:
                self._start_zap(_AsyncZap(self))
            except BaseException:
                _unclaim(self)
                raise
            self._loop = loop
        return self

    def stop(self) -> None:
        """Cancel the ZAP and monitor tasks and close their sockets."""
        with _registry_lock:
            _unclaim(self)
            zap, self._zap = self._zap, None
            self._detach_all()
        for task, mon in self._tasks.values():
            task.cancel()
            mon.close(linger=0)
        self._tasks.clear()
        if zap is not None:
            zap.stop()

    async def aclose(self) -> None:
        tasks = [task for task, _ in self._tasks.values()]
        self.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0)  # one loop pass: pyzmq's cancelled ZAP task cleans up

    def _watch(self, address: str, guard: ZapGuard) -> None:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or loop is not self._loop:
            raise LocalProtocolError(
                "guard sockets of an asyncio context from the event loop its "
                "AsyncAuthenticator runs on"
            )
        mon = zmq.asyncio.Socket(self.ctx, zmq.PAIR)
        try:
            mon.linger = 0
            mon.connect(address)
        except BaseException:
            mon.close(linger=0)
            raise
        task = loop.create_task(
            self._monitor(mon, guard), name=f"zmqmesh-zap-monitor-{guard.domain}"
        )
        self._tasks[guard.domain] = (task, mon)

    def _unwatch(self, guard: ZapGuard) -> None:
        task, mon = self._tasks.pop(guard.domain, (None, None))
        if task is not None and mon is not None:
            task.cancel()
            mon.close(linger=0)

    async def _monitor(self, mon: zmq.asyncio.Socket, guard: ZapGuard) -> None:
        try:
            while not self._on_event(guard, await mon.recv_multipart()):
                pass
        except (asyncio.CancelledError, zmq.ZMQError):
            pass
        finally:
            mon.close(linger=0)
            if self._tasks.get(guard.domain, (None, None))[1] is mon:
                del self._tasks[guard.domain]

    async def __aenter__(self) -> AsyncAuthenticator:
        return self if self.running else self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _in_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def guard_server(
    sock: zmq.Socket[Any],
    curve: CurveOptions | None,
    *,
    metrics: Metrics | None = None,
    name: str | None = None,
) -> ZapGuard | None:
    """Enforce `curve.allow` on a CURVE server socket; call after make_socket, before bind.

    Starts the ZAP authenticator of the socket's context or shares the one
    running (a thread for `zmq.Context`, a task for `zmq.asyncio.Context` used
    inside a running loop). Returns None, doing nothing, when `curve` is None
    or a client's. `metrics` (the pattern's own) receives the refusal counters;
    `name` labels the log lines (default: `metrics.component`). Close the
    guard when closing the socket: the last guard stops the authenticator.
    """
    if curve is None or not curve.server:
        return None
    ctx = sock.context
    with _registry_lock:
        entry = _registry.get(_key(ctx))
        if entry is None:
            auth: _ZapBase
            if isinstance(ctx, zmq.asyncio.Context) and _in_loop():
                auth = AsyncAuthenticator(ctx).start()
            else:
                auth = Authenticator(ctx).start()
            entry = _registry[_key(ctx)]
            entry.auto = True
        entry.guards += 1
        auth = entry.auth
    try:
        guard = auth.guard(sock, curve, metrics=metrics, name=name)
    except BaseException:
        _release(auth)
        raise
    guard._shared = True
    return guard
