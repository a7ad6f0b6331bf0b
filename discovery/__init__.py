"""LAN service discovery over mDNS/DNS-SD (python-zeroconf).

Announce a bound endpoint, browse a live table of peers by service name and/or
role, resolve a service to endpoints; blocking and asyncio twins. Browsers are
`zmqmesh.EndpointSource`s, so a pattern follows a service with
`source=ServiceSource("orders", role="worker")`.
"""

from __future__ import annotations

from ._announce import Announcement, AsyncAnnouncement
from ._browse import BrowseEvent
from ._browser import AsyncBrowser, Browser
from ._discovery import (
    DEFAULT_TTL,
    AsyncDiscovery,
    AsyncServiceSource,
    Discovery,
    ServiceSource,
)
from ._engine import IpVersion
from ._records import (
    DEFAULT_SOCKET_TYPES,
    ROLES,
    SERVICE_TYPE,
    SOCKET_TYPES,
    TXT_VERSION,
    Peer,
    Role,
)

__all__ = [
    # discovery
    "AsyncDiscovery",
    "Discovery",
    "IpVersion",
    # announcing
    "Announcement",
    "AsyncAnnouncement",
    # browsing
    "AsyncBrowser",
    "AsyncServiceSource",
    "BrowseEvent",
    "Browser",
    "Peer",
    "ServiceSource",
    # records
    "DEFAULT_SOCKET_TYPES",
    "DEFAULT_TTL",
    "ROLES",
    "SERVICE_TYPE",
    "SOCKET_TYPES",
    "TXT_VERSION",
    "Role",
]
