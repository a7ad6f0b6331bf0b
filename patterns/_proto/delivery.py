"""Delivery contracts of a pipeline channel as sans-I/O machines (DESIGN.md section 3).

Three contracts, chosen per channel with `delivery=`:

- "at-most-once": plain ZeroMQ PUSH/PULL, no acks, no spool (the default).
- "at-least-once": the pusher stores each message in its spool before `send`
  returns, the puller acknowledges a message once the application is done
  with it, the pusher deletes it from the spool on the ack and re-sends what
  is not acknowledged after `ack_timeout` (doubling per attempt up to
  `max_backoff` times), on a reconnect, and after a restart (the spool's
  pending messages survive). Duplicates are possible; losses are not.
- "effectively-once": at-least-once plus the puller's persisted de-dup window
  keyed by message id: a message recorded as done is acknowledged again but
  never handed out again.

Wire: the acknowledged channel runs over DEALER (pusher) / ROUTER (puller), so
one connection carries both directions: data is `[b"", Data header, body...]`
(the directed-pipeline wire), an ack is `[b"", Ack header]` sent back by the
puller's ROUTER to the routing id the data came from (zguide chapter 3, "The
Extended Reply Envelope"). A DEALER deals round-robin over its pullers just as
PUSH does. `Ack.ids` are 16-byte message ids (sender + seq), which stay the
same across a pusher restart because the spool keeps the encoded header.

`SendWindow` (pusher) decides what is in flight, what waits in the spool
(the backlog), what to re-send when, and which spool rows an ack settles.
`ReceiveLedger` (puller) decides what to hand out, what to drop as a
duplicate, what to acknowledge, and which de-dup records to write when.
Time is passed in as `now`; the machines never touch a socket or a file.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final, Literal

from zmqmesh import LocalProtocolError, Message, Metrics

__all__ = [
    "ACK_ONLY",
    "AT_LEAST_ONCE",
    "AT_MOST_ONCE",
    "DELIVER",
    "DELIVERIES",
    "DROP",
    "EFFECTIVELY_ONCE",
    "Delivered",
    "Delivery",
    "ReceiveLedger",
    "SendWindow",
    "begun_key",
    "check_delivery",
]

Delivery = Literal["at-most-once", "at-least-once", "effectively-once"]
AT_MOST_ONCE: Final = "at-most-once"
AT_LEAST_ONCE: Final = "at-least-once"
EFFECTIVELY_ONCE: Final = "effectively-once"
DELIVERIES: Final = (AT_MOST_ONCE, AT_LEAST_ONCE, EFFECTIVELY_ONCE)

#: `ReceiveLedger.receive` verdicts.
DELIVER: Final = 0  # hand the message to the application
ACK_ONLY: Final = 1  # done before: acknowledge again, do not hand out
DROP: Final = 2  # in the application's hands right now: its ack will follow
_INF: Final = float("inf")
_BEGUN: Final = b"B"


def check_delivery(value: object, what: str) -> Delivery:
    """`value` as a delivery contract, or a `LocalProtocolError` naming the choices."""
    if value not in DELIVERIES:
        raise LocalProtocolError(
            f"{what}: delivery must be one of {', '.join(DELIVERIES)}, not {value!r}"
        )
    return value


def begun_key(message_id: bytes) -> bytes:
    """The de-dup window key saying "handed to the application" (17 bytes, never an id)."""
    return _BEGUN + message_id


class Delivered(Message):
    """A message from an acknowledged channel; `in_doubt` marks an interrupted hand-out.

    `in_doubt` is True only under effectively-once, when a crash interrupted an
    earlier hand-out of this message id after it was recorded as begun and
    before it was recorded as done: the application's side effect may or may
    not have happened, so it should check before doing it again.
    """

    in_doubt: bool = False

    @classmethod
    def of(cls, msg: Message, in_doubt: bool = False) -> Delivered:
        """`msg` as delivered (Message is a Struct: no `__init__` to override)."""
        return cls(msg.header, msg.frames, msg.topic, msg.peer, in_doubt)


class _InFlight:
    __slots__ = ("attempts", "deadline", "frames", "seq")

    def __init__(self, seq: int, frames: list[bytes], deadline: float) -> None:
        self.seq = seq
        self.frames = frames
        self.deadline = deadline
        self.attempts = 1


class SendWindow:
    """The pusher's side: in flight (sent, not acked), backlog (stored, not sent), re-sends.

    Every message is in the spool before the machine hears of it (`stored`).
    At most `window` are in flight; the rest stay only in the spool (the
    backlog, the rows from `backlog_from` on, in spool order) and are fetched
    when acks make room (`want_fetch` / `fetched`), so memory stays bounded
    while a puller is away. Rows are sent in spool order: once there is a
    backlog, a new message joins it rather than overtaking it.
    """

    __slots__ = (
        "_c",
        "_suspect",
        "ack_timeout",
        "backlog",
        "backlog_from",
        "inflight",
        "max_backoff",
        "metrics",
        "window",
    )

    def __init__(
        self,
        *,
        window: int = 1000,
        ack_timeout: float = 2.0,
        max_backoff: int = 8,
        metrics: Metrics | None = None,
        name: str = "pusher",
    ) -> None:
        if window < 1:
            raise LocalProtocolError(f"{name}: window must be >= 1 messages, not {window}")
        if not ack_timeout > 0:
            raise LocalProtocolError(f"{name}: ack_timeout must be > 0 seconds, not {ack_timeout}")
        if max_backoff < 1:
            raise LocalProtocolError(f"{name}: max_backoff must be >= 1, not {max_backoff}")
        self.window = window
        self.ack_timeout = ack_timeout
        self.max_backoff = max_backoff
        self.metrics = metrics if metrics is not None else Metrics(name)
        self._c = self.metrics.counters
        for key in ("acked", "resent", "unknown_acks", "reconnects"):
            self._c.setdefault(key, 0)
        #: message id -> what is in flight (insertion order = send order).
        self.inflight: dict[bytes, _InFlight] = {}
        self.backlog = 0
        self.backlog_from = 0  # lowest spool seq of the backlog (0: no backlog)
        self._suspect: set[bytes] = set()  # in flight when a connection went down

    # ----------------------------------------------------------------- queries
    @property
    def unacked(self) -> int:
        """Messages stored and not yet acknowledged (in flight plus backlog)."""
        return len(self.inflight) + self.backlog

    def next_deadline(self) -> float:
        """When the oldest in-flight message is due for a re-send (`inf`: none)."""
        return min((f.deadline for f in self.inflight.values()), default=_INF)

    def want_fetch(self) -> tuple[int, int] | None:
        """(first spool seq, how many) to read from the spool and send, or None."""
        room = self.window - len(self.inflight)
        if self.backlog and room > 0:
            return self.backlog_from, min(room, self.backlog)
        return None

    # ------------------------------------------------------------------ events
    def restored(self, pending: int, first_seq: int) -> None:
        """After a restart: `pending` rows from `first_seq` on are unacknowledged."""
        if pending > 0:
            self.backlog = pending
            self.backlog_from = first_seq

    def stored(self, seq: int, message_id: bytes, frames: list[bytes], now: float) -> bool:
        """A message is in the spool as row `seq`; True: send it now (it is in flight)."""
        if self.backlog or len(self.inflight) >= self.window:
            # min(): concurrent senders (asyncio) may report their rows out of order.
            self.backlog_from = min(self.backlog_from, seq) if self.backlog else seq
            self.backlog += 1
            return False
        self.inflight[message_id] = _InFlight(seq, frames, now + self.ack_timeout)
        return True

    def fetched(
        self, rows: Sequence[tuple[int, bytes, list[bytes]]], now: float
    ) -> list[tuple[bytes, list[bytes]]]:
        """Rows `(seq, message id, frames)` read for `want_fetch`: (id, frames) to send."""
        out: list[tuple[bytes, list[bytes]]] = []
        deadline = now + self.ack_timeout
        for seq, mid, frames in rows:
            self.backlog_from = seq + 1
            if mid in self.inflight:
                # Sent already (a later row that went straight out while an earlier
                # one was reported late): not part of the backlog, never sent twice.
                continue
            self.backlog -= 1
            self.inflight[mid] = _InFlight(seq, frames, deadline)
            out.append((mid, frames))
        if not rows or self.backlog <= 0:
            # Fewer rows than counted (a tool dead-lettered or purged some): what
            # the spool no longer holds is not a backlog.
            self.backlog, self.backlog_from = 0, 0
        return out

    def acked(self, ids: Iterable[bytes]) -> list[int]:
        """An Ack from a puller: the spool rows it settles (unknown ids are counted)."""
        seqs: list[int] = []
        inflight = self.inflight
        for mid in ids:
            entry = inflight.pop(mid, None)
            if entry is None:
                self._c["unknown_acks"] += 1  # a duplicate's ack, or one from before a restart
            else:
                seqs.append(entry.seq)
        self._c["acked"] += len(seqs)
        return seqs

    def due(self, now: float) -> list[tuple[bytes, list[bytes]]]:
        """(id, frames) of the in-flight messages whose ack is overdue: send them again."""
        out: list[tuple[bytes, list[bytes]]] = []
        for mid, entry in self.inflight.items():
            if entry.deadline <= now:
                # Back off per attempt (1x, 2x, 4x ... max_backoff x ack_timeout) so a
                # slow puller is not buried under copies of what it is working on.
                factor = min(1 << min(entry.attempts, 30), self.max_backoff)
                entry.attempts += 1
                entry.deadline = now + self.ack_timeout * factor
                out.append((mid, entry.frames))
        self._c["resent"] += len(out)
        return out

    def deferred(self, message_id: bytes) -> None:
        """ZeroMQ could not take this message (no connection yet): send it on the next one."""
        self._suspect.add(message_id)

    def disconnected(self) -> None:
        """A connection went down: what is in flight now may have died in its pipe."""
        self._suspect.update(self.inflight)

    def reconnected(self, now: float) -> None:
        """A connection came up: re-send at once what was in flight when one went down.

        ZeroMQ drops the messages queued to a connection that breaks, so those
        would otherwise wait for their ack timeout. The first connection (no
        disconnect before it) re-sends nothing.
        """
        self._c["reconnects"] += 1
        inflight = self.inflight
        for mid in self._suspect:
            entry = inflight.get(mid)
            if entry is not None:
                entry.deadline = min(entry.deadline, now)
        self._suspect.clear()


class ReceiveLedger:
    """The puller's side: hand out, drop duplicates, batch acks, plan de-dup records.

    Life of a message id M from peer P:

    1. `receive(P, M, done, begun)`, with `done` / `begun` what the de-dup
       window says (effectively-once; both False otherwise). Done before:
       ACK_ONLY (its first ack was lost). In the application's hands now:
       DROP (a re-send racing the ack). Else DELIVER; under effectively-once the
       driver must first commit `records(M)` (the previous message's done mark
       and M's begun mark, in one transaction) before handing M out.
    2. `done(M)` when the application is finished with it (the next `recv`, an
       explicit `ack`, or a handler returning): M's ack is queued, and under
       effectively-once M's done mark is planned (committed before the ack goes).
    3. `take_acks()` hands the driver the acks to send, per peer.
    """

    __slots__ = (
        "_c",
        "_marked",
        "_marks",
        "ack_batch",
        "acks",
        "durable",
        "in_hand",
        "metrics",
    )

    def __init__(
        self,
        *,
        delivery: Delivery = AT_LEAST_ONCE,
        ack_batch: int = 64,
        metrics: Metrics | None = None,
        name: str = "puller",
    ) -> None:
        if delivery == AT_MOST_ONCE:
            raise LocalProtocolError(f"{name}: a ReceiveLedger is for acknowledged delivery")
        if ack_batch < 1:
            raise LocalProtocolError(f"{name}: ack_batch must be >= 1, not {ack_batch}")
        self.durable = delivery == EFFECTIVELY_ONCE
        self.ack_batch = ack_batch
        self.metrics = metrics if metrics is not None else Metrics(name)
        self._c = self.metrics.counters
        for key in ("duplicates_acked", "duplicates_dropped", "acks_out", "in_doubt"):
            self._c.setdefault(key, 0)
        #: message id -> peer, handed out and not yet done.
        self.in_hand: dict[bytes, bytes] = {}
        #: peer -> message ids to acknowledge.
        self.acks: dict[bytes, list[bytes]] = {}
        self._marks: list[bytes] = []  # done marks not yet committed (effectively-once)
        self._marked: set[bytes] = set()  # the same, to look up

    @property
    def pending_acks(self) -> int:
        return sum(map(len, self.acks.values()))

    def receive(self, peer: bytes, message_id: bytes, done: bool, begun: bool) -> int:
        """DELIVER, ACK_ONLY or DROP for a message that came in (see the class docstring)."""
        if done or message_id in self._marked:
            self._c["duplicates_acked"] += 1
            self.acks.setdefault(peer, []).append(message_id)
            return ACK_ONLY
        if message_id in self.in_hand:
            self._c["duplicates_dropped"] += 1
            return DROP
        self.in_hand[message_id] = peer
        if begun:
            self._c["in_doubt"] += 1
        return DELIVER

    def records(self, message_id: bytes) -> list[bytes]:
        """De-dup keys to commit in one transaction before handing out `message_id`.

        The planned done marks go in the same commit as the begun mark, so a
        message costs one commit, and a begun mark never lands without the done
        marks that came before it.
        """
        keys = self.take_marks()
        keys.append(begun_key(message_id))
        return keys

    def forget(self, message_id: bytes) -> None:
        """The hand-out did not happen (its begun record failed): a re-send may deliver."""
        self.in_hand.pop(message_id, None)

    def done(self, message_id: bytes) -> bool:
        """The application finished `message_id`; True when the acks should go out now."""
        peer = self.in_hand.pop(message_id, None)
        if peer is None:
            return False  # done twice, or never handed out: nothing to acknowledge
        if self.durable:
            self._marks.append(message_id)
            self._marked.add(message_id)
        acks = self.acks.setdefault(peer, [])
        acks.append(message_id)
        return len(acks) >= self.ack_batch

    def take_marks(self) -> list[bytes]:
        """The done marks to commit before `take_acks` (effectively-once)."""
        keys = self._marks
        self._marks = []
        self._marked.clear()
        return keys

    def take_acks(self) -> list[tuple[bytes, list[bytes]]]:
        """(peer, message ids) to acknowledge, for the driver to send; resets them.

        Under effectively-once, call it only after `take_marks()` is committed:
        an ack tells the pusher to forget the message, so the record must be
        on disk first.
        """
        if not self.acks:
            return []
        out = [(peer, ids) for peer, ids in self.acks.items() if ids]
        self.acks = {}
        self._c["acks_out"] += sum(len(ids) for _, ids in out)
        return out
