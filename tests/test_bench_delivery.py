"""`zmqmesh bench delivery`: the rows it prints (tiny counts; the figures go in the README)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from zmqmesh.cli import main

pytestmark = pytest.mark.timeout(150)

SHARED = ("pattern", "count", "size", "zmqmesh_msgs_per_s", "raw_msgs_per_s", "ratio")


def bench(*argv: str) -> list[dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "zmqmesh", "bench", "delivery", "--repeat", "1", *argv, "--json"],
        capture_output=True,
        text=True,
        timeout=140,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_bench_delivery_json_has_a_row_per_contract_with_the_shared_keys() -> None:
    rows = bench("--count", "60", "--fast-count", "600", "--many", "20")
    labels = [row["policy"] for row in rows]
    assert labels == [
        "at-most-once",
        "at-least-once, send()",
        "at-least-once, send_many(20)",
        "effectively-once, send()",
        "effectively-once, send_many(20)",
        "queue",
        "queue, spool=",
    ]
    for row in rows:
        for key in SHARED:
            assert key in row, (key, row)
        assert row["pattern"] == "delivery"
        assert row["zmqmesh_msgs_per_s"] > 0 and row["raw_msgs_per_s"] > 0
        assert row["ratio"] > 0
    assert rows[0]["count"] == 600 and all(row["count"] == 60 for row in rows[1:])
    for row in rows[1:5]:
        assert row["fsync"] == "batch" and row["vs_at_most_once"] > 0
    assert rows[6]["vs_plain"] > 0


def test_bench_delivery_runs_the_chosen_contract_with_the_chosen_fsync() -> None:
    rows = bench("--contract", "effectively-once", "--fsync", "always", "--count", "30")
    assert [(row["contract"], row["mode"]) for row in rows] == [
        ("effectively-once", "send"),
        ("effectively-once", "send_many"),
    ]
    assert all(row["fsync"] == "always" and "vs_at_most_once" not in row for row in rows)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [(["--count", "0"], "--count"), (["--many", "0"], "--many"), (["--size", "-1"], "--size")],
)
def test_bench_delivery_refuses_bad_counts_naming_the_flag(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "delivery", *argv]) == 2
    assert flag in capsys.readouterr().err
