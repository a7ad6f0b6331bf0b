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

Wire: `[Data header, body...]` on PUSH/PULL; `[b"", Data header, body...]`
from a dealer, seen by the router behind the dealer's routing id. The
protocol decisions live in `patterns._proto.pipeline`.
"""

from __future__ import annotations

from ._pipeline_async import AsyncDealer, AsyncPuller, AsyncPusher, AsyncRouter
from ._pipeline_sync import Dealer, Puller, Pusher, Router
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
    # batching defaults
    "DEFAULT_BATCH_BYTES",
    "DEFAULT_BATCH_COUNT",
    "DEFAULT_BATCH_LINGER",
]
