"""The messaging patterns, each a blocking class and an asyncio twin.

- `patterns.pipeline`: point-to-point (PUSH/PULL, directed DEALER/ROUTER)
- `patterns.pubsub`: publish-subscribe with a forwarder
- `patterns.reqrep`: request-reply with Lazy Pirate retries
- `patterns.pirate`: the Paranoid Pirate reliable worker queue

Protocol logic lives in sans-I/O machines under `patterns._proto`; the
modules here are thin drivers around them.
"""
