"""Publish-subscribe: topic prefixes, loss detection, late joiners, a forwarder.

    pub = Publisher(bind="tcp://127.0.0.1:5556", last_value=True)
    pub.wait_for_subscribers(timeout=5)      # no slow-joiner loss
    pub.publish("prices.eurusd", b"1.0842")

    sub = Subscriber(connect="tcp://127.0.0.1:5556", topics=["prices."])
    msg = sub.recv(timeout=5)                # Message: .topic, .body, .decode(T)
    sub.gaps                                 # {sender id: messages lost}

- `Publisher` / `AsyncPublisher`: XPUB; numbers every message per publisher
  and per topic; optional last value per topic for late joiners; counts
  subscriptions; `when_full` chooses drop / skip (counted) / block.
- `Subscriber` / `AsyncSubscriber`: SUB; live `subscribe` / `unsubscribe`;
  gaps per publisher (`gaps`, `on_gap`, metrics); duplicates and bad input
  dropped and counted; several publishers, or an endpoint source.
- `Forwarder` / `AsyncForwarder`: XSUB (publishers) / XPUB (subscribers)
  proxy that forwards subscriptions up and messages down, bodies untouched.

Wire: `[topic, Data header, body]`. The rules (numbering, duplicates,
replays, what is counted) are in `patterns._proto.pubsub`.
"""

from __future__ import annotations

from ._proto.pubsub import Gap
from ._pubsub_common import WhenFull
from ._pubsub_forwarder import AsyncForwarder, Forwarder
from ._pubsub_publisher import AsyncPublisher, Publisher
from ._pubsub_subscriber import AsyncSubscriber, Subscriber

__all__ = [
    # publisher
    "AsyncPublisher",
    "Publisher",
    "WhenFull",
    # subscriber
    "AsyncSubscriber",
    "Gap",
    "Subscriber",
    # forwarder
    "AsyncForwarder",
    "Forwarder",
]
