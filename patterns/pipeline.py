"""Point-to-point messaging: PUSH/PULL pipelines and directed DEALER/ROUTER.

- `Pusher` / `AsyncPusher` (PUSH): each message to exactly one connected
  puller, round-robin (fan-out); opt-in batching of small messages into one
  frame (`batch=True`, Kafka-style linger).
- `Puller` / `AsyncPuller` (PULL): messages from every pusher, fair-queued
  (fan-in); batches unpacked transparently; TTLs enforced; bad input counted,
  logged once per peer and dropped.
- `Router` / `AsyncRouter` (ROUTER) and `Dealer` / `AsyncDealer` (DEALER with
  a `name`): directed messages to a named peer; sending to a peer that is not
  connected raises `SendError` naming it.

Delivery contracts, one per channel (`delivery=` on both ends):
"at-most-once" (the default: plain PUSH/PULL), "at-least-once" (the pusher
stores each message in `spool=PATH` and re-sends it until a puller
acknowledges it; over DEALER/ROUTER) and "effectively-once" (plus the
puller's persisted de-dup window, `dedup=PATH`). Acknowledging ends are
`AckedPusher` / `AckedPuller` (and the asyncio twins), which `Pusher(...)`
and `Puller(...)` build when asked for a contract; received messages are
`Delivered` (with `in_doubt`). See `patterns._proto.delivery`.

Wire: `[Data header, body...]` on PUSH/PULL; `[b"", Data header, body...]`
from a dealer, seen by the router behind the dealer's routing id. The
protocol decisions live in `patterns._proto.pipeline`.
"""

from __future__ import annotations

from ._delivery_async import AsyncAckedPuller, AsyncAckedPusher
from ._delivery_sync import AckedPuller, AckedPusher
from ._pipeline_async import AsyncDealer, AsyncPuller, AsyncPusher, AsyncRouter
from ._pipeline_directed import Dealer, Router
from ._pipeline_sync import Puller, Pusher
from ._proto.delivery import (
    AT_LEAST_ONCE,
    AT_MOST_ONCE,
    DELIVERIES,
    EFFECTIVELY_ONCE,
    Delivered,
    Delivery,
)
from ._proto.pipeline import DEFAULT_BATCH_BYTES, DEFAULT_BATCH_COUNT, DEFAULT_BATCH_LINGER

__all__ = [
    # push / pull
    "AsyncPuller",
    "AsyncPusher",
    "Puller",
    "Pusher",
    # directed
    "AsyncDealer",
    "AsyncRouter",
    "Dealer",
    "Router",
    # delivery contracts
    "AT_LEAST_ONCE",
    "AT_MOST_ONCE",
    "DELIVERIES",
    "EFFECTIVELY_ONCE",
    "AckedPuller",
    "AckedPusher",
    "AsyncAckedPuller",
    "AsyncAckedPusher",
    "Delivered",
    "Delivery",
    # batching defaults
    "DEFAULT_BATCH_BYTES",
    "DEFAULT_BATCH_COUNT",
    "DEFAULT_BATCH_LINGER",
]
