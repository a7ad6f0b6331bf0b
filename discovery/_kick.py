"""A one-shot mDNS query from a private port, answered straight back by unicast.

RFC 6762 §6.7: a query whose source port is not 5353 is a "legacy unicast"
query, and a responder answers it at once by unicast to that port (and, for
the benefit of everyone else, also by multicast). Browsing starts with one:

* A QU question (§5.4) is answered by unicast to port 5353 of the asking
  host when the records were multicast recently. On a host where several
  processes share port 5353 (every zmqmesh process, avahi-daemon), the
  kernel hands such a datagram to one socket of the group only, often
  another process's, and the answer is lost; the browser then hears it a
  second later, from its next query (1.1 s median measured here).
* A QM question is answered by multicast after 20-120 ms, or after a full
  second if the records were multicast in the last second (§14).

Our private socket is ours alone, so the answer arrives in about a
millisecond. Answers are fed into zeroconf's cache as if they came from its
own sockets; the multicast answers and the regular browser queries keep the
cache in step afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any, Final

from zeroconf import DNSIncoming, Zeroconf  # type: ignore[attr-defined]

from ._engine import _Engine

__all__: list[str] = []

log = logging.getLogger("zmqmesh.discovery")

_MDNS_PORT: Final = 5353
_MDNS_V4: Final = "224.0.0.251"
_MDNS_V6: Final = "ff02::fb"


class _AnswerSink(asyncio.DatagramProtocol):
    """Feeds unicast answers to our private socket into zeroconf's cache."""

    def __init__(self, zc: Zeroconf) -> None:
        self._zc = zc
        self.answers = 0

    def datagram_received(self, data: bytes, addr: Any) -> None:
        # RFC 6762 §11 spirit: only a responder (source port 5353) answers us.
        if addr[1] != _MDNS_PORT or self._zc.done:
            return
        scope = addr[3] if len(addr) > 3 else None
        msg = DNSIncoming(data, (addr[0], addr[1]), scope)
        if not msg.valid or not msg.is_response():
            return
        self.answers += 1
        self._zc.record_manager.async_updates_from_response(msg)

    def error_received(self, exc: Exception) -> None:
        log.debug("legacy unicast query socket error: %s", exc)


def _v4_socket(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(address))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        sock.bind((address, 0))
    except BaseException:
        sock.close()
        raise
    return sock


def _v6_socket(index: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 1)
        sock.bind(("::", 0))
    except BaseException:
        sock.close()
        raise
    return sock


async def _unicast_query(engine: _Engine, packets: list[bytes], window: float) -> int:
    """Send `packets` from private sockets on every interface; listen `window` s.

    Returns the number of answers received. Failing sockets are skipped: the
    regular multicast queries still find everything, only later.
    """
    loop = asyncio.get_running_loop()
    sink = _AnswerSink(engine.zc)
    transports: list[asyncio.DatagramTransport] = []
    targets: list[tuple[socket.socket, tuple[Any, ...]]] = []
    try:
        for address in engine.interfaces.v4_sources:
            with contextlib.suppress(OSError):
                targets.append((_v4_socket(address), (_MDNS_V4, _MDNS_PORT)))
        for index in engine.interfaces.v6_indexes:
            with contextlib.suppress(OSError):
                targets.append((_v6_socket(index), (_MDNS_V6, _MDNS_PORT, 0, index)))
        for sock, dest in targets:
            transport, _ = await loop.create_datagram_endpoint(lambda: sink, sock=sock)
            transports.append(transport)
            for packet in packets:
                transport.sendto(packet, dest)
        await asyncio.sleep(window)
    finally:
        for transport in transports:
            transport.close()
        for sock, _ in targets[len(transports) :]:
            sock.close()
    return sink.answers
