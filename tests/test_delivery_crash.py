"""Crash tests of the delivery contracts: pusher and puller SIGKILLed at random moments.

A pusher process sends messages "0".."N-1" through its spool; after each
`send()` returns (the message is committed: acknowledged to the caller) it
appends the index to `sent.log`. A restarted pusher resumes after the last
logged index. A puller process runs `serve(handler)`; the handler appends
`<message id> <body>` to `effects.log` and fsyncs it: the side effect. The
test SIGKILLs one side, then the other, every 0.1-0.5 s and restarts it.

What is checked is exactly what the README promises:

- at-least-once: every index in `sent.log` shows up in `effects.log`
  (duplicates allowed).
- effectively-once: the same, and each message id's side effect is in
  `effects.log` exactly once. The handler is handed a message id again only
  if a kill interrupted its earlier hand-out (`msg.in_doubt`): then, and only
  then, it checks `effects.log` before acting (the documented duty of an
  effectively-once handler); any other hand-out acts blindly, so an id handed
  out twice without `in_doubt` would show up twice. There are no more
  in-doubt hand-outs than puller kills.
"""

from __future__ import annotations

import contextlib
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._tools import fixed_port
from zmqmesh.testing import wait_until

pytestmark = pytest.mark.timeout(60)

PUSHER = r"""
import os, sys
from patterns.pipeline import Pusher
endpoint, spool, log, total = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
start = 0
if os.path.exists(log):
    with open(log) as f:
        done = [int(line) for line in f.read().split()]
    start = max(done) + 1 if done else 0
out = open(log, "a")
pusher = Pusher(connect=endpoint, spool=spool, ack_timeout=0.5, window=500)
for i in range(start, total):
    pusher.send(str(i).encode())
    out.write(f"{i}\n")
    out.flush()  # in the OS before the next step: survives SIGKILL
while not pusher.drain(1.0):
    pass
pusher.close()
open(log + ".done", "w").close()
"""

PULLER = r"""
import os, sys
from patterns.pipeline import Puller
endpoint, delivery, dedup, effects = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
kw = {"dedup": dedup} if delivery == "effectively-once" else {}
puller = Puller(bind=endpoint, delivery=delivery, **kw)
fd = os.open(effects, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

def already(mid):
    with open(effects, "rb") as f:
        return any(line.split(b" ")[0] == mid for line in f)

def handler(msg):
    mid = msg.id.hex().encode()
    if msg.in_doubt:
        # Interrupted before: the side effect may be done. Check, then act.
        if already(mid):
            os.write(fd, b"skip " + mid + b"\n")
            os.fsync(fd)
            return
        tag = b" doubt\n"
    else:
        tag = b" fresh\n"
    os.write(fd, mid + b" " + msg.body + tag)
    os.fsync(fd)

puller.serve(handler)
"""


class Side:
    """One side's process, restartable."""

    def __init__(self, args: list[str]) -> None:
        self.args = args
        self.kills = 0
        self.proc = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-c", *self.args])

    def kill_and_restart(self) -> None:
        self.kill()
        self.kills += 1
        self.proc = self._start()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # SIGKILL
        self.proc.wait(10)


def died(side: Side) -> bool:
    return side.proc.poll() is not None


def run_chaos(tmp_path: Path, delivery: str, total: int, budget: float) -> dict[str, object]:
    endpoint = f"tcp://127.0.0.1:{fixed_port()}"
    sent_log = tmp_path / "sent.log"
    effects = tmp_path / "effects.log"
    dedup = tmp_path / "dedup.spool"
    rng = random.Random()
    puller = Side([PULLER, endpoint, delivery, str(dedup), str(effects)])
    pusher = Side([PUSHER, endpoint, str(tmp_path / "out.spool"), str(sent_log), str(total)])
    done = Path(str(sent_log) + ".done")
    started = time.monotonic()
    try:
        while not done.exists():
            elapsed = time.monotonic() - started
            assert elapsed < budget, f"not done after {budget} s"
            # Act every 0.1-0.5 s while the run lasts (the kills stop after 60%
            # of the budget so it ends), sooner if it is done or a side died.
            with contextlib.suppress(TimeoutError):
                wait_until(
                    lambda: done.exists() or died(pusher) or died(puller),
                    timeout=rng.uniform(0.1, 0.5),
                    interval=0.01,
                )
            for side, name in ((pusher, "pusher"), (puller, "puller")):
                if died(side) and not done.exists():
                    pytest.fail(f"the {name} died on its own: exit {side.proc.returncode}")
            if done.exists() or elapsed > budget * 0.6:
                continue
            # Turn about, so both sides are killed however short the run.
            victim = pusher if (pusher.kills + puller.kills) % 2 == 0 else puller
            victim.kill_and_restart()
    finally:
        pusher.kill()
        puller.kill()
    sent = [int(x) for x in sent_log.read_text().split()]
    lines = [line.split() for line in effects.read_bytes().splitlines()]
    return {
        "sent": sent,
        "effects": [x for x in lines if x[0] != b"skip"],
        "skips": [x for x in lines if x[0] == b"skip"],
        "pusher_kills": pusher.kills,
        "puller_kills": puller.kills,
        "elapsed": time.monotonic() - started,
    }


def test_at_least_once_nothing_acknowledged_is_lost(tmp_path: Path) -> None:
    r = run_chaos(tmp_path, "at-least-once", 2_000, 35.0)
    assert int(r["pusher_kills"]) >= 1 and int(r["puller_kills"]) >= 1  # type: ignore[call-overload]
    sent: list[int] = r["sent"]  # type: ignore[assignment]
    effects: list[list[bytes]] = r["effects"]  # type: ignore[assignment]
    bodies = {int(e[1]) for e in effects}
    assert set(range(2_000)) <= set(sent)  # the pusher got through them all
    missing = set(sent) - bodies
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {sorted(missing)[:5]}"
    print(
        f"\nat-least-once: {len(sent)} acknowledged sends, {len(effects)} handler runs "
        f"({len(effects) - len(bodies)} duplicates), pusher killed {r['pusher_kills']}x, "
        f"puller killed {r['puller_kills']}x, {r['elapsed']:.1f} s"
    )


def test_effectively_once_each_message_id_takes_effect_once(tmp_path: Path) -> None:
    r = run_chaos(tmp_path, "effectively-once", 5_000, 40.0)
    assert int(r["pusher_kills"]) >= 2 and int(r["puller_kills"]) >= 2  # type: ignore[call-overload]
    sent: list[int] = r["sent"]  # type: ignore[assignment]
    effects: list[list[bytes]] = r["effects"]  # type: ignore[assignment]
    skips: list[list[bytes]] = r["skips"]  # type: ignore[assignment]
    ids = [e[0] for e in effects]
    dupes = len(ids) - len(set(ids))
    assert dupes == 0, f"{dupes} message ids took effect twice"
    # Nothing acknowledged to the pusher's caller is lost.
    bodies = {int(e[1]) for e in effects}
    missing = set(sent) - bodies
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {sorted(missing)[:5]}"
    # In doubt only after a puller kill, at most one message per kill (serve
    # hands out one message at a time).
    in_doubt = sum(1 for e in effects if e[2] == b"doubt") + len(skips)
    assert in_doubt <= int(r["puller_kills"])  # type: ignore[call-overload]
    print(
        f"\neffectively-once: {len(sent)} acknowledged sends, {len(set(ids))} ids took "
        f"effect once each; {in_doubt} in-doubt hand-outs ({len(skips)} found done); "
        f"pusher killed {r['pusher_kills']}x, puller killed {r['puller_kills']}x, "
        f"{r['elapsed']:.1f} s"
    )
