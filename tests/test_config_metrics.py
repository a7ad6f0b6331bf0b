"""Relay configuration decoding and the Prometheus exposition."""

from __future__ import annotations

import pathlib

import pytest
from prometheus_client.parser import text_string_to_metric_families

from zmqmesh import ConfigError, Metrics
from zmqmesh._config import load_config, parse_config
from zmqmesh._metrics import render_prometheus

GOOD = """
[node]
name = "r1"
grace = 2.5

[[forwarder]]
name = "events"
frontend = "tcp://127.0.0.1:5550"
backend = "tcp://127.0.0.1:5551"
announce = "events"

[[queue]]
name = "jobs"
frontend = "tcp://127.0.0.1:5555"
backend = "tcp://127.0.0.1:5556"
max_attempts = 5
"""


def test_good_config_decodes() -> None:
    config = parse_config(GOOD, "relay.toml")
    assert config.node.name == "r1" and config.node.grace == 2.5
    assert [c.name for c in config.components()] == ["events", "jobs"]
    assert config.queue[0].max_attempts == 5 and config.queue[0].heartbeat == 1.0


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("max_attempts = 5", "max_atempts = 5"), "key 'queue[0].max_atempts': unknown key"),
        (("max_attempts = 5", 'max_attempts = "5"'), "key 'queue[0].max_attempts': Expected `int`"),
        (
            ("max_attempts = 5", "max_attempts = 0"),
            "key 'queue[0].max_attempts': Expected `int` >= 1",
        ),
        (("tcp://127.0.0.1:5556", "tcp://127.0.0.1"), "key 'queue[0].backend': endpoint"),
        (("[node]", "[nod]"), "key 'nod': unknown key"),
        (('name = "jobs"', 'name = "events"'), "key 'queue[0].name': duplicate name 'events'"),
        (("grace = 2.5", "grace = "), "not valid TOML"),
        (('name = "jobs"', 'name = "control"'), "key 'queue[0].name': 'control' is reserved"),
    ],
)
def test_config_errors_name_the_file_and_key(edit: tuple[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(GOOD.replace(*edit), "relay.toml")
    text = str(info.value)
    assert text.startswith("relay.toml:") and message in text and "\n" not in text


def test_missing_file(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_no_components() -> None:
    with pytest.raises(ConfigError, match="declares no components"):
        parse_config("[node]\nname = 'x'\n", "relay.toml")


def test_prometheus_exposition_parses_and_matches() -> None:
    jobs, events = Metrics("jobs"), Metrics('ev"ents')
    jobs.inc("messages_in", 7)
    jobs.set_gauge("queue_depth", 3)
    for v in (0.0001, 0.002, 0.3):
        jobs.observe("latency", v)
    events.inc("messages_in", 2)
    families = {
        f.name: f for f in text_string_to_metric_families(render_prometheus([jobs, events]))
    }
    samples = {(s.name, s.labels.get("component"), s.labels.get("le")): s.value
               for f in families.values() for s in f.samples}  # fmt: skip
    assert families["zmqmesh_messages_in"].type == "counter"
    assert samples[("zmqmesh_messages_in_total", "jobs", None)] == 7
    assert samples[("zmqmesh_messages_in_total", 'ev"ents', None)] == 2
    assert samples[("zmqmesh_queue_depth", "jobs", None)] == 3
    assert samples[("zmqmesh_latency_seconds_count", "jobs", None)] == 3
    assert samples[("zmqmesh_latency_seconds_bucket", "jobs", "0.0025")] == 2
    assert samples[("zmqmesh_latency_seconds_bucket", "jobs", "+Inf")] == 3


def test_metrics_http_endpoint() -> None:
    import urllib.request

    from zmqmesh._metrics_http import MetricsServer

    m = Metrics("jobs")
    m.inc("messages_in", 4)
    with MetricsServer(lambda: [m]) as server:
        with urllib.request.urlopen(server.url, timeout=5) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = resp.read().decode()
        m.inc("messages_in")
        with urllib.request.urlopen(server.url, timeout=5) as resp:
            again = resp.read().decode()
    assert 'zmqmesh_messages_in_total{component="jobs"} 4' in text
    assert 'zmqmesh_messages_in_total{component="jobs"} 5' in again


def test_observe_age_samples_envelopes_and_skips_other_frames() -> None:
    import time

    from zmqmesh import PROTOCOL_VERSION, Data, encode_header, observe_age

    m = Metrics("relay")
    created = time.time_ns() - 2_000_000  # 2 ms ago
    observe_age(m, encode_header(Data(version=PROTOCOL_VERSION, sender=b"s" * 8, seq=1,
                                      created_ns=created)))  # fmt: skip
    observe_age(m, b"plain REQ body, not a header")
    observe_age(m, encode_header(Data(version=PROTOCOL_VERSION, sender=b"s" * 8, seq=2,
                                      created_ns=time.time_ns() + 10**9)))  # fmt: skip
    hist = m.histograms["latency"]
    assert hist.count == 2 and hist.sum >= 0.002
    assert hist.counts[0] == 1  # a header from a clock ahead of ours counts as age 0
    assert m.counters == {}  # skipped frames are not errors


def test_relay_help_lists_every_config_key() -> None:
    from zmqmesh._commands.relay import _EPILOG
    from zmqmesh._config import (
        ForwarderConfig,
        NodeConfig,
        QueueConfig,
        SecurityConfig,
        StreamerConfig,
    )

    tables = {"[node]": NodeConfig, "[security]": SecurityConfig,
              "[[forwarder]]": ForwarderConfig, "[[queue]]": QueueConfig,
              "[[streamer]]": StreamerConfig}  # fmt: skip
    listed: dict[str, list[str]] = {}
    current = ""
    for line in _EPILOG.split("exit codes:")[0].splitlines()[1:]:
        head, _, rest = line.strip().partition(" ")
        if head in tables:
            current, line = head, rest
        listed.setdefault(current, []).extend(k.strip() for k in line.split(",") if k.strip())
    for table, struct in tables.items():
        assert listed[table] == list(struct.__struct_fields__), table
