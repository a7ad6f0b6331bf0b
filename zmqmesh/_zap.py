"""Who may connect to a CURVE server: ZAP (ZeroMQ RFC 27) through pyzmq's zmq.auth.

libzmq asks a ZAP handler bound at ``inproc://zeromq.zap.01`` whether a
client that finished the CURVE handshake may connect. There is one such
handler per `zmq.Context`, so zmqmesh runs one `Authenticator` (a thread,
pyzmq's ThreadAuthenticator) or `AsyncAuthenticator` (a task on the event
loop, pyzmq's AsyncioAuthenticator) per context, shared by every guarded
server socket in it: `guard_server(sock, curve)` starts it for the first
server and stops it when the last guard closes.

Each guarded socket gets its own ZAP domain, so the handler knows which
allow-list applies, and ZAP_ENFORCE_DOMAIN, so the socket fails closed if no
handler answers. A refusal is logged with the client's address and the
reason and counted. Clients that never reach ZAP (plain-text, or holding the
wrong server key) fail the ZMTP handshake itself; a socket monitor on the
guarded socket reports those (with the server endpoint; libzmq does not
tell the client's address there).

A monitor's reader must outlive the monitor: libzmq sends events blocking,
so once the reader PAIR is gone the next event wedges libzmq's I/O thread,
and MONITOR_STOPPED wedges the thread that stops the monitor (seen with
libzmq 4.3.5). So the mask leaves MONITOR_STOPPED out, and a guard turns the
socket's monitor off before its reader is closed.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import errno
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Final

import zmq
from zmq.auth.base import Authenticator as _ZmqAuthenticator
from zmq.utils.monitor import parse_monitor_message

from ._context import shared_context
from ._errors import LocalProtocolError, TransportError, map_zmq_errors
from ._metrics import Metrics
from ._security import TrustStore
from ._sockets import CurveOptions

# The authenticators themselves and guard_server are in _zap_auth.py.
__all__ = ["ZapGuard"]

log = logging.getLogger("zmqmesh.security")

_EVENTS: Final = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)  # never MONITOR_STOPPED: see the module docstring
_LOG_PERIOD: Final = 60.0  # a refused client retries every reconnect interval
_domain_ids = itertools.count(1)
# libzmq frees a closed socket's inproc endpoint later, in its reaper thread,
# so the ZAP socket is unbound (synchronous) before it is closed; a bounded
# retry covers a handler stopped without that.
_REBIND_WINDOW: Final = 2.0
_ZAP_ENDPOINT: Final = "inproc://zeromq.zap.01"


def _classify(event: int, value: int) -> tuple[str, str]:
    """(metric suffix, reason) of a refused handshake reported by the monitor."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            return "plaintext", (
                "the client does not speak CURVE (plain text or another mechanism); "
                "give it a key pair and the server's public key"
            )
        if value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
            return "crypto", (
                "the CURVE handshake did not decrypt: the client holds a different "
                "server public key"
            )
        return "protocol", f"ZMTP protocol error {value:#x} during the handshake"
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return "zap_error", f"the ZAP handler could not decide (status {value})"
    if value in (errno.EPIPE, errno.ECONNRESET):
        # The client saw the mismatch first and closed: which side notices a
        # plain-text or wrong-key client first is a race in the greeting.
        return "hangup", (
            "the client hung up during the CURVE handshake: it does not speak CURVE, "
            "or holds another server public key"
        )
    return "no_zap", (
        "no ZAP handler answered, so the socket fails closed; start the "
        "authenticator (guard_server) before bind"
        if value == zmq.EFAULT
        else f"the handshake failed ({zmq.strerror(value)})"
    )


class _Throttle:
    """Log a repeated refusal once per period, then say how many were not logged."""

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen: dict[tuple[str, ...], list[float]] = {}

    def __call__(self, key: tuple[str, ...]) -> int | None:
        now = time.monotonic()
        entry = self._seen.get(key)
        if entry is None or now - entry[0] >= _LOG_PERIOD:
            if len(self._seen) > 4096:  # a scan from many addresses must not grow this
                self._seen.clear()
            self._seen[key] = [now, 0]
            return int(entry[1]) if entry else 0
        entry[1] += 1
        return None


class ZapGuard:
    """One guarded CURVE server socket: its ZAP domain, allow-list and counters.

    Counters (in `metrics`, which may be the pattern's own): ``curve_accepted``,
    ``curve_refused`` and ``curve_refused_<why>`` with why one of unknown_key
    (not in the allow-list), plaintext, crypto (wrong server key), hangup (the
    client closed mid-handshake: one of the two before), no_zap
    (no handler answered: fail closed), zap_error, protocol.
    """

    def __init__(
        self,
        auth: _ZapBase,
        sock: zmq.Socket[Any],
        store: TrustStore | None,
        metrics: Metrics,
        name: str,
        domain: str,
    ) -> None:
        self.authenticator = auth
        self._sock: zmq.Socket[Any] | None = sock
        self.store = store
        self.metrics = metrics
        self.name = name
        self.domain = domain
        self._shared = False  # holds a reference on the context's shared authenticator
        self._closed = False

    @property
    def refusals(self) -> int:
        return self.metrics.get("curve_refused")

    @property
    def accepted(self) -> int:
        return self.metrics.get("curve_accepted")

    def close(self) -> None:
        """Stop watching the socket and forget its allow-list; the last guard of a
        shared authenticator stops it.

        Closing the socket is the caller's job, before or after this. Call it
        from the thread that uses the socket (or after closing the socket): it
        turns the socket's monitor off.
        """
        if self._closed:
            return
        self._closed = True
        self._detach()
        self.authenticator._unguard(self)
        if self._shared:
            _release(self.authenticator)

    def _detach(self) -> None:
        # The monitor goes before its reader (module docstring). libzmq's
        # zmq_socket_monitor takes the socket's monitor lock, so this is safe
        # even from the authenticator's stop() in another thread.
        sock, self._sock = self._sock, None
        if sock is not None and not sock.closed:
            with contextlib.suppress(zmq.ZMQError):
                sock.monitor(None, 0)

    async def aclose(self) -> None:
        """`close`, then let the event loop finish the cancelled watcher tasks."""
        self.close()
        await asyncio.sleep(0)  # one loop pass: cancelled tasks run their cleanup

    def __enter__(self) -> ZapGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ZapGuard({self.name!r}, domain={self.domain!r}, allow={self.store!r})"


class _ZapBase(abc.ABC):
    """What both authenticators share: domains, allow-list checks, refusal logs."""

    def __init__(self, ctx: zmq.Context[Any] | None, metrics: Metrics | None) -> None:
        self.ctx: zmq.Context[Any] = ctx if ctx is not None else shared_context()
        self.metrics = metrics if metrics is not None else Metrics("zap")
        self._guards: dict[str, ZapGuard] = {}
        self._address = "?"  # of the ZAP request being answered (one at a time)
        self._throttle = _Throttle()
        self._zap: _ZmqAuthenticator | None = None

    @property
    def running(self) -> bool:
        return self._zap is not None

    @property
    def refusals(self) -> int:
        """Refused handshakes on every socket this authenticator guards."""
        return self.metrics.get("curve_refused")

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"{type(self).__name__}({state}, guards={len(self._guards)})"

    def guard(
        self,
        sock: zmq.Socket[Any],
        curve: CurveOptions,
        *,
        metrics: Metrics | None = None,
        name: str | None = None,
    ) -> ZapGuard:
        """Put a CURVE server socket under this authenticator; call before bind/connect."""
        if self._zap is None:
            raise LocalProtocolError(f"{self!r}: start() it before guarding sockets")
        if not curve.server:
            raise LocalProtocolError("guard a CURVE server socket; a CURVE client needs no ZAP")
        if sock.context.underlying != self.ctx.underlying:
            raise LocalProtocolError(
                "the socket belongs to another zmq.Context; ZAP handlers are per context"
            )
        last = sock.getsockopt(zmq.LAST_ENDPOINT)
        if last:
            where = last.decode() if isinstance(last, bytes) else str(last)
            raise LocalProtocolError(
                f"guard the socket before bind/connect: it is already on {where}, "
                "and libzmq copies the ZAP domain at bind time"
            )
        domain = f"zmqmesh.{next(_domain_ids)}"
        if metrics is None:
            metrics = Metrics(name or "curve")
        guard = ZapGuard(
            self, sock, curve.allow, metrics, name or metrics.component or "curve", domain
        )
        monitor = f"inproc://zmqmesh.zap-monitor.{domain}"
        with map_zmq_errors(f"{guard.name}: setting up CURVE access control"):
            sock.zap_domain = domain.encode()
            if curve.allow is not None:
                with contextlib.suppress(zmq.ZMQError):  # libzmq < 4.3 lacks it
                    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
            self._guards[domain] = guard
            self._zap.configure_curve_callback(domain, self)
            sock.monitor(monitor, _EVENTS)
        try:
            self._watch(monitor, guard)
        except BaseException:
            guard._detach()
            self._unguard(guard)
            raise
        log.debug("%s: CURVE server guarded, ZAP domain %s, allow-list %s", guard.name, domain,
                  curve.allow if curve.allow is not None else "any client")  # fmt: skip
        return guard

    def _unguard(self, guard: ZapGuard) -> None:
        if self._guards.pop(guard.domain, None) is None:
            return
        if self._zap is not None:
            self._zap.credentials_providers.pop(guard.domain, None)
            self._unwatch(guard)

    def _detach_all(self) -> None:
        for guard in list(self._guards.values()):
            guard._detach()
        self._guards.clear()

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop answering ZAP requests (each authenticator its own way)."""

    @abc.abstractmethod
    def _watch(self, address: str, guard: ZapGuard) -> None:
        """Read the guarded socket's monitor at `address` (a thread or a task)."""

    @abc.abstractmethod
    def _unwatch(self, guard: ZapGuard) -> None:
        """Stop reading that monitor."""

    def _start_zap(self, zap: _ZmqAuthenticator) -> None:
        # The "*" domain answers CURVE servers in this context that zmqmesh does
        # not guard (no ZAP domain set): admit any key, as without a handler.
        zap.configure_curve_callback("*", self)
        deadline = time.monotonic() + _REBIND_WINDOW
        while True:
            try:
                zap.start()
                break
            except zmq.ZMQError as exc:
                zap.stop()
                if exc.errno != zmq.EADDRINUSE:
                    raise TransportError(f"starting the ZAP handler: {exc.strerror}") from exc
                if time.monotonic() > deadline:
                    raise LocalProtocolError(
                        "another ZAP handler is bound in this zmq.Context "
                        f"(inproc://zeromq.zap.01: {exc.strerror}); run one authenticator "
                        "per context and guard sockets with guard_server() or "
                        "Authenticator.guard()"
                    ) from exc
                # Not a synchronising sleep: a bounded retry while libzmq's
                # reaper releases the previous handler's endpoint.
                time.sleep(0.002)
            except BaseException:
                zap.stop()
                raise
        self._zap = zap

    # Called by pyzmq's Authenticator as a CURVE credentials provider (RFC 27).
    def callback(self, domain: str, key: bytes) -> bool:
        self.metrics.inc("zap_requests")
        guard = self._guards.get(domain)
        if guard is None:
            if domain == "*":
                return True
            why = f"no server is guarded under ZAP domain {domain!r} any more"
            name = "curve"
        else:
            if guard.store is None or guard.store.is_trusted(key):
                return True
            why = (
                f"its key is not in the allow-list {guard.store}; to admit it, copy "
                "the client's NAME.key file there"
            )
            name = guard.name
        self.metrics.inc("zap_refused")
        self.metrics.inc("curve_refused")
        if guard is not None:
            # Counted here, not from the monitor: exact even if someone replaces
            # the socket's monitor, and visible before the client learns of it.
            guard.metrics.inc("curve_refused")
            guard.metrics.inc("curve_refused_unknown_key")
        client_key = key.decode("ascii", "replace")
        suppressed = self._throttle((name, self._address, client_key))
        if suppressed is not None:
            more = f" ({suppressed} more refusals of it not logged)" if suppressed else ""
            log.warning("%s: refused CURVE client %s with public key %s: %s%s",
                        name, self._address, client_key, why, more)  # fmt: skip
        return False

    def _before_zap(self, msg: list[bytes]) -> None:
        # ZAP request frames (RFC 27): version, request id, domain, address,
        # identity, mechanism, credentials...
        self._address = msg[3].decode("utf-8", "replace") if len(msg) > 3 else "?"

    def _on_event(self, guard: ZapGuard, frames: list[bytes]) -> bool:
        """Count and log one monitor event; True when the monitor stopped."""
        event = parse_monitor_message(frames)
        kind, value = int(event["event"]), int(event["value"])
        if kind == zmq.EVENT_MONITOR_STOPPED:
            return True
        if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            guard.metrics.inc("curve_accepted")
            self.metrics.inc("curve_accepted")
            return False
        if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH and value == 400:
            return False  # a ZAP refusal: counted and logged (with the address) by `callback`
        suffix, why = _classify(kind, value)
        endpoint = event["endpoint"].decode("utf-8", "replace")
        suppressed = self._throttle((guard.name, endpoint, suffix))
        if suppressed is not None:
            more = f" ({suppressed} more not logged)" if suppressed else ""
            log.warning("%s: refused a client on %s: %s%s", guard.name, endpoint, why, more)
        guard.metrics.inc("curve_refused")
        guard.metrics.inc(f"curve_refused_{suffix}")
        self.metrics.inc("curve_refused")
        return False


class _UnbindFirst(_ZmqAuthenticator):
    """Unbind the ZAP endpoint before closing the socket (see _REBIND_WINDOW).

    Otherwise a client handshaking just after a stop reaches the closing
    handler, gets no answer and stalls for the handshake interval (30 s).
    Sits between pyzmq's Thread/AsyncioAuthenticator and Authenticator in
    the MRO, so their stop() reaches it after their thread or task is done.
    """

    def stop(self) -> None:
        if self.zap_socket is not None and not self.zap_socket.closed:
            with contextlib.suppress(zmq.ZMQError):  # never bound: start failed
                self.zap_socket.unbind(_ZAP_ENDPOINT)
        super().stop()


# ---------------------------------------------------------------- sharing


@dataclass(slots=True)
class _Shared:
    auth: _ZapBase
    guards: int = 0
    auto: bool = False  # started by guard_server: stopped with its last guard


# One authenticator per libzmq context (there is one ZAP endpoint per context;
# keyed by the libzmq pointer, so a Context.shadow() shares it). The entry
# holds the context, so the pointer is not reused while registered.
_registry: dict[int, _Shared] = {}
_registry_lock = threading.RLock()


def _key(ctx: zmq.Context[Any]) -> int:
    return int(ctx.underlying)


def _claim(auth: _ZapBase) -> None:
    entry = _registry.get(_key(auth.ctx))
    if entry is not None and entry.auth is not auth:
        raise LocalProtocolError(
            f"{entry.auth!r} already serves ZAP for this zmq.Context; one per context "
            "(guard_server shares it)"
        )
    if entry is None:
        _registry[_key(auth.ctx)] = _Shared(auth)


def _unclaim(auth: _ZapBase) -> None:
    entry = _registry.get(_key(auth.ctx))
    if entry is not None and entry.auth is auth:
        del _registry[_key(auth.ctx)]


def _release(auth: _ZapBase) -> None:
    with _registry_lock:
        entry = _registry.get(_key(auth.ctx))
        if entry is None or entry.auth is not auth:
            return
        entry.guards -= 1
        if entry.guards <= 0 and entry.auto:
            # Under the lock: a guard_server racing with us must not find (and
            # count on) an authenticator that is stopping.
            auth.stop()
