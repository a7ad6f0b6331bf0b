"""Request-reply: a ROUTER server and a DEALER client with Lazy Pirate retries.

- `Server` / `AsyncServer`: a ROUTER that answers each request with
  `handler(message)` (sync or async); many clients; an ERROR reply when the
  handler raises; plain REQ clients served too.
- `Client` / `AsyncClient`: a DEALER with correlation ids (never REQ, so a
  lost reply cannot lock it up); per-call timeouts raising `RequestTimeout`;
  Lazy Pirate retries on a fresh socket (zguide chapter 4); several server
  endpoints with failover; many requests in flight from asyncio.

Wire: the client sends `[b"", Data header, body...]` with `correlation_id ==
message_id` and `attempt` counting retries; the server answers `[b"", Reply
header, body...]` echoing the correlation id, with status OK or ERROR. A
Paranoid Pirate queue's frontend (`patterns.pirate`) speaks the same, so a
`Client` works against it unchanged.

The protocol decisions live in `patterns._proto.reqrep`; see its docstring
for the rules (what is retried, what is dropped, what is answered).
"""

from __future__ import annotations

from ._reqrep_client import AsyncClient, Client
from ._reqrep_server import AsyncServer, Handler, Server

__all__ = [
    # server
    "AsyncServer",
    "Handler",
    "Server",
    # client
    "AsyncClient",
    "Client",
]
