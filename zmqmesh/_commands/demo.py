"""`zmqmesh demo`: a whole mesh on this machine, narrated, in a few seconds.

    zmqmesh demo                 # the tour
    zmqmesh demo --no-mdns       # as on a network without multicast: static peers

Six numbered steps: a relay node (forwarder + Paranoid Pirate queue) announced
by mDNS; workers and clients that find it by service name; requests flowing
while a worker is SIGKILLed mid-request and its request finishes elsewhere;
pub/sub with a late joiner served the last value and a slow subscriber that
reports its gap; CURVE with an allow-list refusing a plain-text client; the
metrics of every component. Everything runs on 127.0.0.1 in a temporary
directory, and everything it starts is stopped before it exits (child
processes by process group, sockets with linger 0). Exit 0 when the tour
went as narrated, 1 when a step did not happen in time (the message says
which).
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import shutil
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Final, Protocol

import zmq

from .._config import RelayConfig, load_config
from .._context import new_context
from .._errors import DiscoveryError, MeshError, SendError
from .._metrics import Metrics
from .._sources import EndpointSource, StaticPeers
from ._demo_kit import (
    Children,
    InProcessRelay,
    Narrator,
    Relay,
    Saboteur,
    SubprocessRelay,
    WireTap,
    drain_to_marker,
    find_by_name,
    format_metrics,
    interrupt_on_sigterm,
    loopback_multicast_works,
    pick_endpoint,
    relay_config,
    term_context,
    wait_for,
    write_job_script,
)

__all__ = ["register", "run"]

HEARTBEAT: Final = 0.3  # queue and workers: a silent worker is dead after 1.5 s
LIVENESS: Final = 5
REQUESTS: Final = 10
TICKS: Final = 50_000  # a burst well over what the pipes to a slow subscriber hold
TICK_SIZE: Final = 1000
STEP_TIMEOUT: Final = 10.0  # the longest any one thing may take before the demo gives up


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "demo",
        help="a narrated tour of every pattern on this machine (a few seconds)",
        description="Run a whole mesh on 127.0.0.1 and say what happens: a relay node "
        "announced by mDNS, workers and clients finding it by name, a worker SIGKILLed "
        "mid-request, pub/sub with a late joiner and a gap, CURVE refusing a plain-text "
        "client, and the metrics. Leaves nothing running. Exit 0 when the tour went as "
        "narrated, 1 when a step did not happen in time (the message says which).",
    )
    parser.add_argument(
        "--no-mdns",
        action="store_true",
        help="do not use multicast DNS: connect through a static peer list, as on a "
        "network without multicast",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run the relay in this process instead of as a 'zmqmesh relay' subprocess",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    say = Narrator()
    token = secrets.token_hex(3)  # service names of this run, so parallel runs keep apart
    tmp = Path(tempfile.mkdtemp(prefix="zmqmesh-demo-"))
    ctx: zmq.Context[zmq.Socket[bytes]] = new_context()
    say.title(f"zmqmesh demo: a whole mesh on this machine, in six steps (files in {tmp}).")
    try:
        with interrupt_on_sigterm(), contextlib.ExitStack() as stack:
            children = Children(tmp)
            stack.callback(children.close)
            tour = _Tour(say, tmp, token, ctx, children, stack, args)
            try:
                tour.run()
            except BaseException as exc:
                why = "interrupted" if isinstance(exc, KeyboardInterrupt) else "a step failed"
                say.title(f"\nStopping early ({why})  [{say.elapsed:.1f} s]")
                say.say("Stopping everything the demo started (processes, sockets, files).")
                raise
            say.title(f"\nClosing down  [{say.elapsed:.1f} s]")
            say.say("Workers get SIGTERM; the relay drains, sends mDNS goodbyes and exits;")
            say.say("every socket closes with linger 0.")
        exits = ", ".join(f"{name} {_exit_text(code)}" for name, code in tour.exits.items())
        say.saw(f"{exits}; relay exit status {tour.relay.exit_status}")
    finally:
        term_context(ctx)
        shutil.rmtree(tmp, ignore_errors=True)
    say.saw(f"done in {say.elapsed:.1f} s; nothing left running.")
    return 0


class _Measured(Protocol):
    """Anything with the `.metrics` every pattern keeps."""

    @property
    def metrics(self) -> Metrics: ...


def _exit_text(code: int | None) -> str:
    if code == -9:
        return "had been SIGKILLed"
    if code is None:
        return "did not stop within 3 s of SIGTERM and was SIGKILLed"
    return f"exited with status {code}"


class _Tour:
    """The six steps, in order; each leaves what it started on the exit stack."""

    def __init__(
        self,
        say: Narrator,
        tmp: Path,
        token: str,
        ctx: zmq.Context[zmq.Socket[bytes]],
        children: Children,
        stack: contextlib.ExitStack,
        args: argparse.Namespace,
    ) -> None:
        self.say = say
        self.tmp = tmp
        self.ctx = ctx
        self.children = children
        self.stack = stack
        self.args = args
        self.jobs = f"jobs-{token}"
        self.ticks = f"ticks-{token}"
        self.node = f"demo-relay-{token}"
        self.mdns = False
        self.no_mdns_why = ""  # why the peers get a static list, for the narration
        self.worker_flags: list[str] = []  # how the worker processes find the queue
        self.relay: Relay
        self.exits: dict[str, int | None] = {}  # worker name -> exit status (None: killed)
        self.local: list[_Measured] = []  # this process's components, for the metrics table

    def run(self) -> None:
        self.step_relay()
        queue_source, forwarder = self.step_discovery()
        self.step_requests(queue_source)
        self.step_pubsub(*forwarder)
        self.step_curve()
        self.step_metrics()

    # ----------------------------------------------------------------- 1. relay

    def step_relay(self) -> None:
        say = self.say
        say.step("A relay node: a pub/sub forwarder and a Paranoid Pirate queue")
        if self.args.no_mdns:
            self.no_mdns_why = "mDNS is off (--no-mdns), as on a network without multicast."
        elif not loopback_multicast_works():
            self.no_mdns_why = (
                "Multicast does not work on 127.0.0.1 here (it needs `ip link set lo "
                "multicast on`, which takes root), so mDNS cannot run."
            )
        self.mdns = not self.no_mdns_why
        say.say("A relay is the fixed point of a mesh: publishers and subscribers meet at")
        say.say("its forwarder 'ticks', clients and workers at its queue 'jobs'.")
        if self.mdns:
            say.say("It announces both by mDNS, so nobody needs to be told a port.")
        path = self.tmp / "relay.toml"
        path.write_text(
            relay_config(
                node=self.node,
                jobs=self.jobs if self.mdns else None,
                ticks=self.ticks if self.mdns else None,
                heartbeat=HEARTBEAT,
                liveness=LIVENESS,
            )
        )
        config = load_config(path)  # the same validation `zmqmesh relay --check` does
        self.relay = self._start_relay(path, config)
        self.stack.callback(self.relay.close)
        r = self.relay
        say.saw(f"relay running {r.how}; it bound:")
        say.lines(
            [
                f"forwarder ticks: publishers -> {r.forwarder_frontend}, "
                f"subscribers -> {r.forwarder_backend}",
                f"queue jobs: clients -> {r.queue_frontend}, workers -> {r.queue_backend}",
                f"heartbeats every {config.queue[0].heartbeat:g} s both ways; a worker silent "
                f"for {config.queue[0].heartbeat * config.queue[0].liveness:g} s is dead",
            ]
        )

    def _start_relay(self, path: Path, config: RelayConfig) -> Relay:
        """The relay of the config at `path`; the one place that decides how it runs."""
        if self.args.in_process:
            return InProcessRelay(config, path)
        return SubprocessRelay(self.children, path, ctx=self.ctx, timeout=STEP_TIMEOUT)

    # ------------------------------------------------------------- 2. discovery

    def step_discovery(self) -> tuple[EndpointSource, tuple[str, str]]:
        say = self.say
        say.step("Finding each other by service name (mDNS / DNS-SD)")
        r = self.relay
        if self.mdns:
            from discovery import Discovery

            say.say(f"The relay announced '{self.jobs}' and '{self.ticks}' on 127.0.0.1.")
            say.say("We ask for them by name, as any client or worker on the LAN would:")
            try:
                disc = Discovery(interfaces=["127.0.0.1"])
                self.stack.callback(disc.close)
                t0 = time.monotonic()
                peers = [
                    *find_by_name(disc, self.jobs, ("queue", "queue-backend"), timeout=5),
                    *find_by_name(disc, self.ticks, ("forwarder", "subscriber"), timeout=5),
                ]
                ms = (time.monotonic() - t0) * 1000
            except (DiscoveryError, OSError) as exc:  # no answer, or no mDNS socket here
                self.no_mdns_why = f"mDNS did not work here ({exc})."
                self.mdns = False
            else:
                say.lines([f"{p.service:<13} {p.role:<14} {p.endpoint}" for p in peers])
                say.saw(f"resolved {len(peers)} endpoints in {ms:.0f} ms")
                # Publishers connect to the forwarder's XSUB, announced as a subscriber
                # (it subscribes on their behalf); subscribers to its XPUB.
                front = pick_endpoint(peers, "subscriber", "XSUB")
                back = pick_endpoint(peers, "forwarder", "XPUB")
                self.worker_flags = ["--service", self.jobs, "--interface", "127.0.0.1"]
                from discovery import ServiceSource

                source = ServiceSource(self.jobs, role="queue", discovery=disc)
                self.stack.callback(source.close)
                # The client follows the service from now on; wait for its first peer.
                wait_for(lambda: source.peers, STEP_TIMEOUT, f"a peer of {self.jobs}")
                return source, (front, back)
        for line in textwrap.wrap(self.no_mdns_why, 76):
            say.say(line)
        say.say("Without mDNS the same code takes a static peer list instead:")
        say.say("zmqmesh.StaticPeers([...]) has the API of a discovery browser.")
        say.saw(f"static peers: queue {r.queue_frontend}, workers {r.queue_backend}")
        self.worker_flags = ["--connect", r.queue_backend]
        return StaticPeers([r.queue_frontend]), (r.forwarder_frontend, r.forwarder_backend)

    # -------------------------------------------------------------- 3. requests

    def step_requests(self, source: EndpointSource) -> None:
        from patterns.reqrep import Client

        say = self.say
        say.step("Requests through the queue; a worker SIGKILLed mid-request")
        job = write_job_script(self.tmp)
        marks = self.tmp / "marks"
        marks.mkdir()
        names = ("w1", "w2")
        pids = {}
        for name in names:
            argv = [sys.executable, "-m", "zmqmesh", "worker", *self.worker_flags]
            argv += ["--heartbeat", str(HEARTBEAT), "--liveness", str(LIVENESS), "--name", name]
            argv += ["--", "sh", str(job), name, str(marks)]
            pids[name] = self.children.spawn(name, argv)
        # Stopped before the relay (the exit stack unwinds last-in first-out), so
        # they leave while their queue is still there.
        self.stack.callback(self._stop_workers, names)
        say.say("Two workers start as processes of their own (zmqmesh worker -- sh job.sh),")
        if self.mdns:
            say.say(f"find the queue's backend by name (--service {self.jobs}) and say READY.")
        else:
            say.say("connect to the backend from the static list and say READY (RFC 6).")
        wait_for(self._workers_idle(names), STEP_TIMEOUT, "two workers joining the queue")
        say.saw(f"w1 (pid {pids['w1']}) and w2 (pid {pids['w2']}) are idle at the queue")

        how = "found the queue by name" if self.mdns else "has the queue from the static list"
        say.say(f"A client ({how}) sends {REQUESTS} requests, one after the other;")
        say.say("the queue hands each to the least recently used idle worker.")
        client = Client(source=source, ctx=self.ctx, timeout=STEP_TIMEOUT, retries=1, name="client")
        self.stack.callback(client.close)
        self.local.append(client)
        done_by: Counter[str] = Counter()
        for i in range(1, REQUESTS + 1):
            body = client.request(f"job {i}".encode()).body.decode()
            done_by[body.rpartition(" ")[2]] += 1
        split = ", ".join(f"{n} did {done_by[n]}" for n in names)
        say.saw(f"{REQUESTS} requests answered: {split}")

        say.say("Now a long job. Whichever worker takes it is SIGKILLed while it works,")
        say.say("and its command with it (the whole process group).")
        before = self.relay.stats()["jobs"]
        t0 = time.monotonic()
        with Saboteur(self.children, names, marks, timeout=STEP_TIMEOUT) as saboteur:
            reply = client.request(b"long job", timeout=STEP_TIMEOUT, retries=0).body.decode()
        took = time.monotonic() - t0
        victim = saboteur.victim

        def redispatched() -> dict[str, float] | None:
            jobs = self.relay.stats()["jobs"]
            return jobs if jobs.get("redispatches", 0) else None

        after = wait_for(redispatched, STEP_TIMEOUT, "the queue counting the re-dispatch")
        say.saw(f"worker {victim} (pid {pids[victim]}) was SIGKILLed holding 'long job'")
        if after.get("workers_unreachable", 0) > before.get("workers_unreachable", 0):
            say.saw(f"the queue's next heartbeat to {victim} found its connection gone")
        else:
            say.saw(f"the queue heard nothing from {victim} for {HEARTBEAT * LIVENESS:g} s")
        say.saw(f"so it re-dispatched the request: redispatches = {after['redispatches']:g}")
        finisher = reply.rpartition(" ")[2]
        say.saw(f"request finished on another worker: '{reply}' ({took:.1f} s, no retry needed)")
        if finisher == victim:
            raise MeshError(f"the long job came back from {victim}, which was killed")

    def _stop_workers(self, names: tuple[str, ...]) -> None:
        for name in names:
            self.exits[name] = self.children.stop(name, grace=3.0)

    def _workers_idle(self, names: tuple[str, ...]) -> Callable[[], bool]:
        def idle() -> bool:
            for name in names:
                self.children.check_alive(name)  # a worker that died says why, at once
            return self.relay.stats()["jobs"].get("workers_idle", 0) >= len(names)

        return idle

    # ---------------------------------------------------------------- 4. pubsub

    def step_pubsub(self, frontend: str, backend: str) -> None:
        from patterns.pubsub import Gap, Publisher, Subscriber

        say = self.say
        say.step("Pub/sub through the forwarder: a late joiner, and a gap")
        ctx = self.ctx
        early = Subscriber(connect=backend, topics=["prices."], ctx=ctx, name="early")
        self.stack.callback(early.close)
        pub = Publisher(connect=frontend, last_value=True, when_full="block", ctx=ctx, name="feed")
        self.stack.callback(pub.close)
        self.local += [pub, early]
        pub.wait_for_subscribers(1, timeout=STEP_TIMEOUT, topic="prices.")
        quotes = [("prices.eurusd", "1.0842"), ("prices.gbpusd", "1.2650")]
        quotes.append(("prices.eurusd", "1.0845"))
        for topic, value in quotes:
            pub.publish(topic, value.encode())
        for _ in quotes:
            early.recv(timeout=STEP_TIMEOUT)
        say.say("A publisher 'feed' sends 3 quotes, which subscriber 'early' gets. It keeps")
        say.say("the last value per topic: when a new subscription reaches it (the forwarder")
        say.say("passes every one up), it sends the matching last values again. So 'late',")
        say.say("subscribing to 'prices.' only now, is not left waiting for the next quote:")
        late = Subscriber(connect=backend, topics=["prices."], ctx=ctx, name="late")
        self.stack.callback(late.close)
        self.local.append(late)
        got = sorted(
            (m.topic.decode(), m.body.decode())
            for m in (late.recv(timeout=STEP_TIMEOUT) for _ in range(2))
        )
        values = ", ".join(f"{t} = {v}" for t, v in got)
        say.saw("late joiner got the last value of each topic at once:")
        say.saw(values)
        pub.publish("prices.eurusd", b"1.0846")
        early.recv(timeout=STEP_TIMEOUT)
        late.recv(timeout=STEP_TIMEOUT)
        dups = early.metrics.get("duplicates")
        say.saw(f"'early' saw the replays too and dropped them as duplicates (duplicates = {dups})")

        say.say(f"A subscriber 'slow' that does not read while {TICKS:,} ticks of {TICK_SIZE} B")
        say.say("go by: the forwarder's pipe to it fills up (its high-water mark) and ZeroMQ")
        say.say("drops what does not fit. Every message is numbered, so 'slow' knows.")
        gaps: list[Gap] = []
        slow = Subscriber(
            connect=backend, topics=["ticks."], hwm=100, on_gap=gaps.append, ctx=ctx, name="slow"
        )
        self.stack.callback(slow.close)
        self.local.append(slow)
        pub.wait_for_subscribers(1, timeout=STEP_TIMEOUT, topic="ticks.")
        sent = received = 0
        for burst in (TICKS, 2 * TICKS):  # a second, bigger burst if the first fit
            body = bytes(TICK_SIZE)
            for _ in range(burst):
                pub.publish("ticks.eurusd", body)
            sent += burst
            received += drain_to_marker(pub, slow, "ticks.eurusd", timeout=STEP_TIMEOUT)
            if gaps:
                break
            say.saw(
                f"all {sent:,} fitted into the pipes (large socket buffers?): {burst * 2:,} more"
            )
        if not gaps:
            raise MeshError(f"{sent:,} ticks fitted into the pipes; no gap to show")
        missed = sum(g.missed for g in gaps)
        first = gaps[0]
        say.saw(
            f"slow received {received:,} of {sent:,} ticks, "
            f"and reported {len(gaps)} sequence gap(s):"
        )
        say.saw(
            f"{missed:,} messages missed (the first gap: expected #{first.expected:,}, "
            f"got #{first.received:,})"
        )

    # ----------------------------------------------------------------- 5. CURVE

    def step_curve(self) -> None:
        from patterns.pipeline import Puller, Pusher

        from .._security import client_curve, server_curve, write_certificate

        say = self.say
        say.step("CURVE: encryption, an allow-list, and a plain-text client refused")
        keys, allow = self.tmp / "keys", self.tmp / "allow"
        server = write_certificate(keys, "server")
        alice = write_certificate(keys, "alice")
        allow.mkdir()
        shutil.copy(alice.public_file, allow / "alice.key")
        say.say("Key pairs for a server and for alice (what `zmqmesh keygen` writes);")
        say.say("alice's public key goes into the server's allow-list directory. alice")
        say.say("connects through a tap that copies every byte on the TCP stream.")
        say.saw(f"server public key {server.public_key.decode()} ({server.public_file.name})")
        ctx = self.ctx
        vault = Puller(
            bind="tcp://127.0.0.1:*",
            curve=server_curve(server.secret_file, allow=allow),
            ctx=ctx,
            name="vault",
        )
        self.stack.callback(vault.close)
        self.local.append(vault)
        tap = WireTap(vault.endpoints[0])
        self.stack.callback(tap.close)
        sender = Pusher(
            connect=tap.endpoint,
            curve=client_curve(alice.secret_file, server.public_file),
            ctx=ctx,
            send_timeout=STEP_TIMEOUT,
            name="alice",
        )
        self.stack.callback(sender.close)
        sender.send(b"the launch codes")
        msg = vault.recv(timeout=STEP_TIMEOUT)
        # Counted from the socket monitor's handshake event, which may come after the message.
        accepted = wait_for(
            lambda: vault.metrics.get("curve_accepted"), STEP_TIMEOUT, "the handshake counted"
        )
        say.saw(f"alice -> vault over CURVE: '{msg.body.decode()}' (curve_accepted = {accepted})")
        wire = tap.seen
        if msg.body in wire:
            raise MeshError("the message crossed the wire in plain text")
        say.saw(f"the tap copied {len(wire)} bytes: '{msg.body.decode()}' is not among them")
        say.say("Now a client without keys tries the same server:")
        plain = Pusher(connect=vault.endpoints[0], ctx=ctx, send_timeout=0.3, name="plain")
        self.stack.callback(plain.close)
        wait_for(
            lambda: vault.metrics.get("curve_refused_plaintext"),
            STEP_TIMEOUT,
            "the server refusing the plain-text client",
        )
        try:
            plain.send(b"let me in")
        except SendError:
            outcome = "its send gave up (SendError): no connection ever completed"
        else:
            raise MeshError("the plain-text client's message was taken")
        say.saw(f"plain-text client refused in the handshake; {outcome}")
        refused = vault.metrics.get("curve_refused_plaintext")
        say.saw(f"the server counted curve_refused_plaintext = {refused} and logged why (stderr)")

    # --------------------------------------------------------------- 6. metrics

    def step_metrics(self) -> None:
        say = self.say
        say.step("The metrics table")
        text = (
            "Every component counts what it did and what it dropped. The relay's come "
            f"from {self.relay.stats_from}; this process's from their .metrics. "
            "Non-zero values only:"
        )
        for line in textwrap.wrap(text, 76):
            say.say(line)
        stats = self.relay.stats()
        for comp in self.local:
            stats[comp.metrics.component] = comp.metrics.snapshot()
        say.lines(format_metrics(stats))
