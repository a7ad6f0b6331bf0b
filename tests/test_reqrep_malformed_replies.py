"""The blocking Client's hot path against a server that sends garbage before (and after) its reply.

`Client.request` reads a reply frame by frame with the `more` flag of each
frame (no `recv_multipart`): these tests pin down that this never takes a
frame of the next message for part of this one, that each malformed message
is dropped whole and counted, and that the next request is not disturbed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import zmq

from patterns._proto.reqrep_server import ServerMachine
from patterns.reqrep import Client
from zmqmesh import PROTOCOL_VERSION, Data, Reply, encode_header

pytestmark = pytest.mark.timeout(20)

Ctx = zmq.Context[zmq.Socket[bytes]]


def _garbage() -> list[list[bytes]]:
    """Malformed replies (after the routing identity); each is dropped and counted."""
    data = encode_header(Data(version=PROTOCOL_VERSION, sender=b"S" * 8, seq=1, created_ns=0))
    return [
        [b"x"],  # one frame, no delimiter
        [b""],  # a delimiter and nothing after it
        [b"", b"\xc1"],  # a header that is not msgpack
        [b"", b"\xc1", b"a", b"b", b"c"],  # several frames: all of them are dropped
        [b"", data, b"body"],  # a Data header where a Reply belongs
    ]


class _UnrulyServer:
    """A ROUTER on a thread: before each proper reply it sends `before`, after it `after`."""

    def __init__(self, ctx: Ctx, before: list[list[bytes]], after: list[list[bytes]]) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.rcvtimeo = 100
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.before = before
        self.after = after
        self.machine = ServerMachine(name="unruly")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="unruly-server", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                frames = self.sock.recv_multipart()
            except zmq.Again:
                continue
            request = self.machine.receive(frames)
            assert request is not None
            ident = frames[0]
            for junk in self.before:
                self.sock.send_multipart([ident, *junk])
            # A well-formed Reply for another request: a late reply, not garbage.
            other = Reply(PROTOCOL_VERSION, b"S" * 8, 1, 0, b"X" * 16)
            self.sock.send_multipart([ident, b"", encode_header(other), b"other"])
            reply = self.machine.reply(request, [request.body])
            # The proper reply's own frames, but with a bad delimiter: dropped too.
            self.sock.send_multipart([ident, b"not empty", *reply[2:]])
            self.sock.send_multipart(reply)
            for junk in self.after:
                self.sock.send_multipart([ident, *junk])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close(0)


@pytest.fixture
def unruly(ctx: Ctx) -> Iterator[_UnrulyServer]:
    server = _UnrulyServer(ctx, before=_garbage(), after=[[b"", b"\xc1", b"zz"]])
    try:
        yield server
    finally:
        server.close()


def test_garbage_before_a_reply_is_dropped_whole_and_counted(
    ctx: Ctx, unruly: _UnrulyServer
) -> None:
    with Client(connect=unruly.endpoint, ctx=ctx, timeout=5.0, retries=0) as client:
        reply = client.request(b"one")
        assert reply.body == b"one"
        # Every malformed message counted once, the proper reply with a bad
        # delimiter among them; the other request's Reply is a late reply.
        per_request = len(_garbage()) + 1
        assert client.metrics.get("decode_errors") == per_request
        assert client.metrics.get("late_replies") == 1


def test_garbage_after_a_reply_does_not_disturb_the_next_request(
    ctx: Ctx, unruly: _UnrulyServer
) -> None:
    with Client(connect=unruly.endpoint, ctx=ctx, timeout=5.0, retries=0) as client:
        bodies = [b"first", b"second", b"third"]
        assert [client.request(b).body for b in bodies] == bodies
        # The trailing garbage of one round is read (and dropped) in the next,
        # before that round's own; the last round's is never read.
        per_round = len(_garbage()) + 1
        assert client.metrics.get("decode_errors") == per_round * 3 + 2
        assert client.metrics.get("late_replies") == 3
        assert client.metrics.get("replies") == 3
