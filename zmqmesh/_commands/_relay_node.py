"""`RelayNode`: the components of one relay config, composed and run in one process.

This is composition-root code (it imports `patterns` and `discovery`), so it
lives under `zmqmesh._commands` and `import zmqmesh` never loads it. Each
component runs its own pattern driver on its own thread (`Forwarder`,
`Queue`, `Streamer`): the relay adds the wiring around them: CURVE for every
socket, mDNS announcements, the control socket, the metrics endpoint, and a
drain on shutdown.

Shutdown (`drain` then `close`), in this order:
1. mDNS goodbyes, so no new client finds this node;
2. every component stops taking new work and finishes what it holds, all in
   parallel, within the grace period: a queue answers every request it has
   read (waiting or at a worker), a streamer lets what it pulled leave, a
   forwarder (at-most-once, like PUB/SUB itself) stops;
3. the sockets close and the private ZeroMQ context terminates, which waits
   (bounded by the rest of the grace period) for the last replies to leave.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import pathlib
import threading
import time
from typing import Any

import zmq

from discovery import Announcement, Discovery
from patterns.pirate import Queue
from patterns.pubsub import Forwarder, Subscriber
from patterns.streamer import Streamer

from .._config import ForwarderConfig, QueueConfig, RelayConfig, StreamerConfig
from .._context import new_context
from .._errors import ConfigError, LocalProtocolError, Timeout
from .._metrics import Metrics
from .._metrics_http import MetricsServer
from .._security import server_curve
from .._sockets import DEFAULT_HWM, CurveOptions
from ._control import ControlServer

__all__ = ["RelayNode", "check_supported"]

log = logging.getLogger("zmqmesh.relay")

_MONITOR_HWM = 10 * DEFAULT_HWM
_STREAMER_COUNTERS = ("messages_in", "messages_out", "bytes_in", "bytes_out", "dropped_on_stop")


class _Component:
    """One configured component: its driver, what it bound, what it announces."""

    def __init__(self, kind: str, name: str, driver: Any, endpoints: dict[str, str]) -> None:
        self.kind = kind
        self.name = name
        self.driver = driver
        self.endpoints = endpoints
        # (endpoint key, role, socket type): what a peer of each side browses for.
        self.announce: list[tuple[str, str, str]] = []
        self.service: str | None = None
        self.gaps: _GapMonitor | None = None
        self.drained = True

    @property
    def metrics(self) -> Metrics:
        m: Metrics = self.driver.metrics
        return m

    def drain(self, grace: float) -> None:
        if self.gaps is not None:
            self.gaps.close()
        driver = self.driver
        if isinstance(driver, (Queue, Streamer)):
            self.drained = driver.drain(grace)
        else:
            driver.stop()

    def line(self) -> str:
        eps = " ".join(f"{k}={v}" for k, v in self.endpoints.items())
        return f"{self.kind} {self.name} {eps}"


class _GapMonitor:
    """A subscription to everything on a forwarder's inproc side, counting sequence gaps.

    The forwarder itself never decodes headers (it moves frames untouched);
    this monitor does, on its own thread, with the subscriber's machine, and
    copies its `gaps` / `messages_missed` counts into the forwarder's metrics.
    A monitor that falls behind by a whole high-water mark counts its own
    drops as gaps too.
    """

    def __init__(
        self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, into: Metrics, name: str
    ) -> None:
        self._into = into
        into.counters.setdefault("sequence_gaps", 0)
        into.counters.setdefault("messages_missed", 0)
        # A deep inproc queue (10x the default HWM, small messages: a few MB at
        # most) so that a burst the forwarder moves faster than this thread
        # decodes is not counted as a gap.
        self._sub = Subscriber(
            connect=endpoint, topics=[b""], ctx=ctx, hwm=_MONITOR_HWM, name=f"{name}.gaps"
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"zmqmesh-relay-gaps-{name}")
        self._thread.start()

    def _run(self) -> None:
        sub, into, own = self._sub, self._into.counters, self._sub.metrics.counters
        try:
            while not self._stop.is_set():
                with contextlib.suppress(Timeout):  # wake up to hear close()
                    sub.recv(timeout=0.1)
                into["sequence_gaps"] = own["gaps"]
                into["messages_missed"] = own["messages_missed"]
        finally:
            sub.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def _queue_accepts_spool() -> bool:
    return "spool" in inspect.signature(Queue.__init__).parameters


def check_supported(config: RelayConfig, source_name: str = "<config>") -> None:
    """Raise `ConfigError` for what the config names but this host or build cannot
    serve: unreadable key files, a spool on a queue without one (`--check` too)."""
    if config.security is not None:
        _security(config, source_name)
    for i, q in enumerate(config.queue):
        if q.spool is not None and not _queue_accepts_spool():
            raise ConfigError(
                f"{source_name}: key 'queue[{i}].spool': durable queues are not available in "
                "this version (patterns.pirate.Queue takes no spool=); remove the key"
            )


def _beside(path: str, source_name: str) -> pathlib.Path:
    """A relative path in the config is relative to the config file, not to the cwd."""
    p = pathlib.Path(path)
    config_file = pathlib.Path(source_name)
    if not p.is_absolute() and config_file.is_file():
        return config_file.parent / p
    return p


def _security(config: RelayConfig, source_name: str) -> CurveOptions | None:
    sec = config.security
    if sec is None:
        return None
    allow = None if sec.allow is None else _beside(sec.allow, source_name)
    try:
        return server_curve(_beside(sec.secret_key, source_name), allow=allow)
    except ConfigError as exc:
        raise ConfigError(f"{source_name}: key 'security': {exc}") from exc


class RelayNode:
    """Forwarders, queues and streamers of one `RelayConfig`, in this process.

    `start()` binds everything (port 0 / `tcp://host:*` gets a real port; see
    `endpoints`), announces and starts serving; `drain(grace)` then `close()`
    shut down gracefully; `close()` alone stops at once. `source_name` (the
    config file) names the file in errors. `metrics_port` / `control`
    override `node.metrics_port` / `node.control` (the CLI flags).
    """

    def __init__(
        self,
        config: RelayConfig,
        source_name: str = "<config>",
        *,
        metrics_port: int | None = None,
        control: str | None = None,
    ) -> None:
        self.config = config
        self.source_name = source_name
        self.name = config.node.name
        self._metrics_port = metrics_port if metrics_port is not None else config.node.metrics_port
        self._control_ep = control if control is not None else config.node.control
        self._ctx: zmq.Context[zmq.Socket[bytes]] = new_context()
        self._components: list[_Component] = []
        self._control: ControlServer | None = None
        self._http: MetricsServer | None = None
        self._discovery: Discovery | None = None
        self._announcements: list[Announcement] = []
        self._curve: CurveOptions | None = None
        self._node_metrics = Metrics("node")
        self._started_at = 0.0
        self._linger_until = 0.0  # set by drain(): when the last replies must have left
        self._state = "new"
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ start

    def start(self) -> RelayNode:
        """Bind, announce and serve every component; on any failure close what was made."""
        if self._state != "new":
            raise LocalProtocolError(f"relay {self.name} was already started; make a new one")
        self._state = "running"
        self._started_at = time.monotonic()
        try:
            check_supported(self.config, self.source_name)
            self._curve = _security(self.config, self.source_name)
            for fwd in self.config.forwarder:
                self._components.append(self._forwarder(fwd))
            for q in self.config.queue:
                self._components.append(self._queue(q))
            for st in self.config.streamer:
                self._components.append(self._streamer(st))
            if self._control_ep is not None:
                self._control = ControlServer(
                    self._ctx, self._control_ep, self.metrics, node=self.name, curve=self._curve
                )
            if self._metrics_port is not None:
                self._http = MetricsServer(
                    self.metrics, self._metrics_port, self.config.node.metrics_host
                )
            self._announce()
        except BaseException:
            self.close()
            raise
        return self

    def _forwarder(self, c: ForwarderConfig) -> _Component:
        backend = [c.backend]
        monitor_ep = f"inproc://zmqmesh-relay-{id(self):x}-{c.name}-gaps"
        if c.check_gaps:
            backend.append(monitor_ep)
        fwd = Forwarder(
            frontend=c.frontend, backend=backend, ctx=self._ctx, curve=self._curve, name=c.name
        )
        comp = _Component(
            "forwarder",
            c.name,
            fwd,
            {"frontend": fwd.frontend_endpoints[0], "backend": fwd.backend_endpoints[0]},
        )
        # Subscribers look for the forwarder (XPUB); publishers connect to the XSUB,
        # which plays the subscriber's part for them.
        comp.announce = [("backend", "forwarder", "XPUB"), ("frontend", "subscriber", "XSUB")]
        comp.service = c.announce
        fwd.start()
        if c.check_gaps:
            comp.gaps = _GapMonitor(self._ctx, monitor_ep, fwd.metrics, c.name)
        return comp

    def _queue(self, c: QueueConfig) -> _Component:
        extra: dict[str, Any] = {}
        if c.spool is not None:
            extra["spool"] = _beside(c.spool, self.source_name)
        queue = Queue(
            frontend=c.frontend,
            backend=c.backend,
            heartbeat=c.heartbeat,
            liveness=c.liveness,
            max_attempts=c.max_attempts,
            ctx=self._ctx,
            curve=self._curve,
            name=c.name,
            **extra,
        )
        comp = _Component(
            "queue",
            c.name,
            queue,
            {"frontend": queue.frontend_endpoints[0], "backend": queue.backend_endpoints[0]},
        )
        comp.announce = [("frontend", "queue", "ROUTER"), ("backend", "queue-backend", "ROUTER")]
        comp.service = c.announce
        queue.start()
        return comp

    def _streamer(self, c: StreamerConfig) -> _Component:
        st = Streamer(c.pull, c.push, ctx=self._ctx, curve=self._curve, name=c.name)
        comp = _Component(
            "streamer", c.name, st, {"pull": st.pull_endpoints[0], "push": st.push_endpoints[0]}
        )
        for key in _STREAMER_COUNTERS:  # exported from the start, not from the first message
            st.metrics.counters.setdefault(key, 0)
        # Pushers look for a puller (our PULL), pullers for a pusher (our PUSH).
        comp.announce = [("pull", "puller", "PULL"), ("push", "pusher", "PUSH")]
        comp.service = c.announce
        st.start()
        return comp

    def _announce(self) -> None:
        wanted = [c for c in self._components if c.service is not None]
        if not wanted:
            return
        interfaces = self.config.node.interfaces or None
        self._discovery = Discovery(interfaces=interfaces, node_id=self.name)
        key = self._curve.public_key if self._curve is not None else None
        for comp in wanted:
            assert comp.service is not None
            for side, role, socket_type in comp.announce:
                self._announcements.append(
                    self._discovery.announce(
                        comp.endpoints[side],
                        service=comp.service,
                        role=role,
                        socket_type=socket_type,
                        public_key=key,
                        properties={"component": comp.name, "side": side},
                        probe=False,  # default instance names are unique by construction
                    )
                )
        if self._control is not None:
            # `zmqmesh stats --service NODE` finds the control ROUTER: a server of stats.
            self._announcements.append(
                self._discovery.announce(
                    self._control.endpoint,
                    service=self.name,
                    role="server",
                    socket_type="ROUTER",
                    public_key=key,
                    properties={"component": "control"},
                    probe=False,
                )
            )

    # ---------------------------------------------------------------- queries

    @property
    def endpoints(self) -> dict[str, dict[str, str]]:
        """What each component bound (real ports), plus `control` and `metrics` if on."""
        out = {c.name: dict(c.endpoints) for c in self._components}
        if self._control is not None:
            out["control"] = {"control": self._control.endpoint}
        if self._http is not None:
            out["metrics"] = {"metrics": self._http.url}
        return out

    def endpoint_lines(self) -> list[str]:
        """One line per component, as `zmqmesh relay` prints them on start."""
        lines = [c.line() for c in self._components]
        if self._control is not None:
            lines.append(f"control {self._control.endpoint}")
        if self._http is not None:
            lines.append(f"metrics {self._http.url}")
        return lines

    def metrics(self) -> list[Metrics]:
        """Every component's live Metrics, then the node's own (uptime, control requests)."""
        node = self._node_metrics
        node.set_gauge("uptime_seconds", round(time.monotonic() - self._started_at, 3))
        node.set_gauge("components", len(self._components))
        out = []
        for comp in self._components:
            if isinstance(comp.driver, Forwarder):
                comp.metrics.set_gauge("subscriptions", comp.driver.subscriptions())
            out.append(comp.metrics)
        if self._control is not None:
            out.append(self._control.metrics)
        out.append(node)
        return out

    # --------------------------------------------------------------- shutdown

    def drain(self, grace: float | None = None) -> bool:
        """Withdraw the announcements, then let every component finish its work
        within `grace` seconds (default `node.grace`), in parallel. True when
        nothing held was left unanswered."""
        grace = self.config.node.grace if grace is None else grace
        with self._lock:
            if self._state != "running":
                return True
            self._state = "draining"
        self._withdraw()  # goodbyes take a moment; the grace period starts after them
        deadline = time.monotonic() + grace
        threads = [
            threading.Thread(
                target=comp.drain,
                args=(max(0.0, deadline - time.monotonic()),),
                name=f"zmqmesh-relay-drain-{comp.name}",
            )
            for comp in self._components
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self._linger_until = deadline
        left = [c.name for c in self._components if not c.drained]
        if left:
            log.warning("relay %s: %s still held work after %g s", self.name, left, grace)
        return not left

    def _withdraw(self) -> None:
        announcements, self._announcements = self._announcements, []
        for a in announcements:
            try:
                a.close()
            except Exception:
                log.exception("relay %s: withdrawing %r failed", self.name, a)
        if self._discovery is not None:
            disc, self._discovery = self._discovery, None
            disc.close()  # goodbyes (RFC 6762 section 10.1)

    def close(self) -> None:
        """Stop everything now (after `drain`, what is left); safe to call twice."""
        with self._lock:
            if self._state == "closed":
                return
            self._state = "closed"
        self._withdraw()
        if self._http is not None:
            self._http.close()
            self._http = None
        if self._control is not None:
            self._control.close()
        for comp in self._components:
            try:
                if comp.gaps is not None:
                    comp.gaps.close()
                comp.driver.close()
            except Exception:
                log.exception("relay %s: closing %s failed", self.name, comp.name)
        self._term()

    def _term(self) -> None:
        # Sockets closed after a drain linger for the rest of the grace period so
        # their last replies leave; term() waits for exactly that, no longer.
        until = self._linger_until
        done = threading.Event()

        def term() -> None:
            self._ctx.term()
            done.set()

        t = threading.Thread(target=term, name="zmqmesh-relay-term", daemon=True)
        t.start()
        t.join(max(0.0, until - time.monotonic()) + 1.0)
        if not done.is_set():
            log.warning("relay %s: ZeroMQ context did not terminate; exiting anyway", self.name)

    def __enter__(self) -> RelayNode:
        return self.start() if self._state == "new" else self

    def __exit__(self, *exc: object) -> None:
        self.close()
