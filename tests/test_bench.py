"""`zmqmesh bench pipeline|pubsub|reqrep --json`: one JSON row with the keys the README promises.

Small counts: these check the benches run and report, not how fast anything is
(speed is measured by running the benches, never by timed tests).
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(120)

KEYS = {"pattern", "count", "size", "zmqmesh_msgs_per_s", "raw_msgs_per_s", "ratio", "context"}


def bench(*argv: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "zmqmesh", "bench", *argv, "--json"],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()  # progress goes to stderr; stdout is the row
    row: dict[str, Any] = json.loads(line)
    assert set(row) >= KEYS
    assert row["zmqmesh_msgs_per_s"] > 0 and row["raw_msgs_per_s"] > 0 and row["ratio"] > 0
    return row


def test_bench_pipeline_json() -> None:
    row = bench("pipeline", "--count", "3000", "--repeat", "1")
    assert (row["pattern"], row["count"], row["size"], row["context"]) == (
        "pipeline",
        3000,
        100,
        "zmqmesh",
    )
    assert row["batch"] is False and row["transport"] == "tcp"


def test_bench_pipeline_batch_on_plain_contexts_over_ipc() -> None:
    row = bench("pipeline", "--count", "3000", "--repeat", "1", "--batch", "--transport", "ipc",
                "--plain-context")  # fmt: skip
    assert (row["batch"], row["transport"], row["context"]) == (True, "ipc", "plain")


def test_bench_pubsub_json() -> None:
    row = bench("pubsub", "--count", "3000", "--size", "64")
    assert (row["pattern"], row["size"]) == ("pubsub", 64)


def test_bench_reqrep_json_has_latencies() -> None:
    row = bench("reqrep", "--count", "200", "--plain-context")
    assert row["pattern"] == "reqrep" and row["context"] == "plain"
    for key in ("zmqmesh_p50_us", "zmqmesh_p99_us", "raw_p50_us", "raw_p99_us"):
        assert row[key] > 0
    assert row["zmqmesh_p99_us"] >= row["zmqmesh_p50_us"]
