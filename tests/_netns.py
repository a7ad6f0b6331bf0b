"""Network namespaces for multi-host tests: hosts on one LAN, on one machine.

`NetnsLab(["a", "b", "c"])` makes one network namespace per host plus a
"switch" namespace holding a bridge; each host gets an `eth0` veth whose peer
is a bridge port, an address 10.77.0.N/24 and fd77::N/64 (these addresses
exist only inside the namespaces), loopback up, and a multicast route
(224.0.0.0/4 via eth0) so mDNS works. Nothing is added to the machine's own
namespace. `cut(host)` takes the host's switch port down (the cable pulled at
the switch, the host notices nothing); `heal(host)` brings it back.

Processes run inside with `lab.spawn(host, argv)` (`ip netns exec`); the lab
kills them (SIGKILL) and deletes every namespace on `close()`, and a new lab
first removes namespaces left by test processes that died without cleaning
up. The `netns3` fixture (hosts a, b, c; import it into a test module) and
`netns_lab()` skip the test with a clear reason when not root, without `ip`,
or where namespaces are not permitted.

Run `python tests/_netns.py bench` (as root) to measure discovery across
namespaces: the announcer in host b, the measuring side in host a.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

_PREFIX = "zmqmesh"
_SUBNET = "10.77.0"
_SUBNET6 = "fd77"


class NetnsUnavailable(RuntimeError):
    """This machine cannot make network namespaces (the reason says why)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _cleanup_stale() -> None:
    """Delete namespaces made by earlier test processes that are gone."""
    listing = _ip("netns", "list", check=False).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.match(rf"^{_PREFIX}-(\d+)-", name)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            _ip("netns", "del", name, check=False)
        except PermissionError:
            pass


def check_available() -> None:
    """Raise `NetnsUnavailable` with the reason when namespaces cannot be made here."""
    if sys.platform != "linux":
        raise NetnsUnavailable("network namespaces need Linux")
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root (CI runs these tests as root)")
    if shutil.which("ip") is None:
        raise NetnsUnavailable("the `ip` command (iproute2) is not installed")
    probe = f"{_PREFIX}-{os.getpid()}-probe"
    result = _ip("netns", "add", probe, check=False)
    if result.returncode != 0:
        raise NetnsUnavailable(f"`ip netns add` is not permitted here: {result.stderr.strip()}")
    _ip("netns", "del", probe, check=False)


@dataclass
class Host:
    name: str
    netns: str
    address: str  # IPv4, 10.77.0.N
    address6: str  # IPv6 ULA, fd77::N
    port: str  # the bridge port (in the switch namespace) for this host


@dataclass
class NetnsLab:
    """Hosts on one bridged LAN, each in its own network namespace."""

    names: Sequence[str] = ("a", "b", "c")
    hosts: dict[str, Host] = field(default_factory=dict)
    _switch: str = ""
    _procs: list[subprocess.Popen[Any]] = field(default_factory=list)
    _made: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_available()
        _cleanup_stale()
        tag = f"{_PREFIX}-{os.getpid()}-{os.urandom(2).hex()}"
        try:
            self._switch = f"{tag}-sw"
            self._add_netns(self._switch)
            self._run_in(self._switch, "ip", "link", "add", "br0", "type", "bridge")
            self._run_in(self._switch, "ip", "link", "set", "br0", "up")
            for i, name in enumerate(self.names, start=1):
                netns = f"{tag}-{name}"
                self._add_netns(netns)
                port = f"p{i}"
                # Make the pair in the host namespace, then move one end to the switch.
                self._run_in(netns, "ip", "link", "add", "eth0", "type", "veth", "peer", port)
                self._run_in(netns, "ip", "link", "set", port, "netns", self._switch)
                self._run_in(self._switch, "ip", "link", "set", port, "master", "br0")
                self._run_in(self._switch, "ip", "link", "set", port, "up")
                address = f"{_SUBNET}.{i}"
                address6 = f"{_SUBNET6}::{i}"
                self._run_in(netns, "ip", "addr", "add", f"{address}/24", "dev", "eth0")
                # nodad: usable at once, without waiting out duplicate address detection.
                self._run_in(
                    netns, "ip", "-6", "addr", "add", f"{address6}/64", "dev", "eth0", "nodad"
                )
                self._run_in(netns, "ip", "link", "set", "eth0", "multicast", "on")
                self._run_in(netns, "ip", "link", "set", "eth0", "up")
                self._run_in(netns, "ip", "link", "set", "lo", "up")
                self._run_in(netns, "ip", "route", "add", "224.0.0.0/4", "dev", "eth0")
                self.hosts[name] = Host(name, netns, address, address6, port)
        except BaseException:
            self.close()
            raise

    def _add_netns(self, netns: str) -> None:
        result = _ip("netns", "add", netns, check=False)
        if result.returncode != 0:
            raise NetnsUnavailable(f"`ip netns add {netns}` failed: {result.stderr.strip()}")
        self._made.append(netns)

    def _run_in(self, netns: str, *argv: str) -> None:
        result = subprocess.run(
            ["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, timeout=30
        )
        if result.returncode != 0:
            raise NetnsUnavailable(f"{' '.join(argv)} in {netns} failed: {result.stderr.strip()}")

    def spawn(self, host: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process inside `host`'s namespace; the lab kills it on close."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.hosts[host].netns, *argv], **kwargs)
        self._procs.append(proc)
        return proc

    def cut(self, host: str) -> None:
        """Pull `host`'s cable at the switch: its port goes down, the host sees no change."""
        self._run_in(self._switch, "ip", "link", "set", self.hosts[host].port, "down")

    def heal(self, host: str) -> None:
        self._run_in(self._switch, "ip", "link", "set", self.hosts[host].port, "up")

    def close(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        self._procs.clear()
        # Deleting a namespace destroys its veth ends and the bridge with it.
        for netns in reversed(self._made):
            _ip("netns", "del", netns, check=False)
        self._made.clear()

    def __enter__(self) -> NetnsLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def netns3() -> Iterator[NetnsLab]:
    """Fixture: hosts a, b and c on one LAN (import it into the test module)."""
    with netns_lab(("a", "b", "c")) as lab:
        yield lab


@contextlib.contextmanager
def netns_lab(names: Sequence[str] = ("a", "b", "c")) -> Iterator[NetnsLab]:
    """A lab for a test; skips the test with the reason when namespaces are unavailable."""
    try:
        lab = NetnsLab(names)
    except NetnsUnavailable as exc:
        pytest.skip(f"multi-host test skipped: {exc}")
    try:
        yield lab
    finally:
        lab.close()


def _loopback_multicast_works() -> bool:
    """Send one multicast datagram out of 127.0.0.1 and see whether it comes back."""
    import socket

    group = "239.255.77.77"
    recv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    send = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        recv.bind(("", 0))
        port = recv.getsockname()[1]
        membership = socket.inet_aton(group) + socket.inet_aton("127.0.0.1")
        recv.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
        recv.settimeout(1.0)
        send.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
        send.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        token = os.urandom(8)
        send.sendto(token, (group, port))
        while True:
            data, _ = recv.recvfrom(64)
            if data == token:
                return True
    except OSError:
        return False
    finally:
        recv.close()
        send.close()


def ensure_loopback_multicast() -> None:
    """Make sure mDNS can run on 127.0.0.1, or skip the test saying why.

    Linux loops multicast back to local members even when `lo` lacks the
    MULTICAST flag; where it does not, root turns the flag on.
    """
    if _loopback_multicast_works():
        return
    if os.geteuid() == 0 and shutil.which("ip"):
        _ip("link", "set", "lo", "multicast", "on", check=False)
        if _loopback_multicast_works():
            return
    pytest.skip("multicast on 127.0.0.1 does not work here (needs `ip link set lo multicast on`)")


def _bench(argv: Sequence[str]) -> int:
    """`zmqmesh peers --bench` in host a against an announcer in host b (extra args pass on)."""
    with NetnsLab(("a", "b")) as lab:
        prefix = f"ip netns exec {lab.hosts['b'].netns}"
        argv = ["peers", "--bench", "--announcer-prefix", prefix, *argv]
        return lab.spawn("a", [sys.executable, "-m", "zmqmesh", *argv]).wait()


if __name__ == "__main__":
    if sys.argv[1:2] == ["bench"]:
        sys.exit(_bench(sys.argv[2:]))
    print(__doc__)
    sys.exit(2)
