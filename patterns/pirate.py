"""The Paranoid Pirate reliable worker queue (ZeroMQ RFC 6; zguide chapter 4).

Clients (`patterns.reqrep.Client`, or any REQ/DEALER) connect to the queue's
frontend ROUTER; workers connect DEALERs to its backend ROUTER and speak RFC 6
exactly (READY 0x01, HEARTBEAT 0x02, requests `[client address, b"", body...]`),
so a worker or queue written from the spec in any language interoperates.

- `Queue` / `AsyncQueue`: LRU worker choice, heartbeats both ways, re-dispatch
  of a dead worker's request, max attempts then dead letters, priority lanes
  0-9 with aging, request TTL, back-pressure.
- `Worker` / `AsyncWorker`: a handler function (sync or async), heartbeats,
  liveness, reconnects with backoff and a fresh identity.
- `Queue(spool=PATH)`: a durable queue; accepted requests are committed
  before dispatch, survive a kill and are re-dispatched after a restart,
  client retries are matched to them (`patterns._proto.durable_queue`).
- Dead letters: `DeadLetter` (reason and `Attempt` history), the
  `DeadLetterSink` protocol and `MemoryDeadLetters`, the default sink.

The protocol decisions live in `patterns._proto.pirate_queue` and
`patterns._proto.pirate_worker`; see their docstrings for the rules.
"""

from __future__ import annotations

from zmqmesh._deadletter import Attempt, DeadLetter, DeadLetterSink, MemoryDeadLetters

from ._pirate_queue import AsyncQueue, Queue
from ._pirate_worker import AsyncWorker, Handler, Worker
from ._proto.pirate_queue import PRIORITIES

__all__ = [
    # queue
    "PRIORITIES",
    "AsyncQueue",
    "Queue",
    # worker
    "AsyncWorker",
    "Handler",
    "Worker",
    # dead letters
    "Attempt",
    "DeadLetter",
    "DeadLetterSink",
    "MemoryDeadLetters",
]
