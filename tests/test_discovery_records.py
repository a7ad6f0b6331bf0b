"""The pure record mapping: TXT layout and limits, names, endpoint ranking (no network)."""

from __future__ import annotations

import ipaddress

import msgspec
import pytest
import zmq

from discovery import ROLES, SERVICE_TYPE
from discovery._engine import _resolve_interfaces
from discovery._records import (
    _Announced,
    _BadRecord,
    _check_label,
    _decode_txt,
    _default_label,
    _encode_txt,
    _peer_from,
    _rank_endpoints,
    _renamed,
    _service_info,
    _subtype,
)
from zmqmesh import PROTOCOL_VERSION, ConfigError

KEY = zmq.curve_keypair()[0].decode()


def ann(**changes: object) -> _Announced:
    fields: dict[str, object] = {
        "service": "orders",
        "role": "worker",
        "node_id": "n1",
        "socket_type": "DEALER",
        "port": 5555,
    }
    fields.update(changes)
    return _Announced(**fields)  # type: ignore[arg-type]


def as_props(props: dict[str, str]) -> dict[bytes, bytes | None]:
    return {k.encode(): v.encode() for k, v in props.items()}


def test_txt_round_trip_with_txtvers_first() -> None:
    a = ann(public_key=KEY, properties={"zone": "eu"})
    props = _encode_txt(a)
    assert next(iter(props)) == "txtvers"
    assert props["proto"] == str(PROTOCOL_VERSION)
    assert _decode_txt(as_props(props), 5555) == a


def test_txt_keys_are_case_insensitive() -> None:
    props = {k.upper(): v for k, v in _encode_txt(ann()).items()}
    assert _decode_txt(as_props(props), 5555).service == "orders"


def test_txt_string_over_255_bytes_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"TXT entry 'service' is 256 bytes.*RFC 6763"):
        _encode_txt(ann(service="s" * (256 - len("service="))))
    _encode_txt(ann(service="s" * (255 - len("service="))))  # fits exactly
    with pytest.raises(ConfigError, match="'zone'"):
        _encode_txt(ann(properties={"zone": "é" * 200}))


def test_txt_total_size_and_key_rules() -> None:
    big = {f"k{i}": "v" * 200 for i in range(7)}
    with pytest.raises(ConfigError, match="fits one packet"):
        _encode_txt(ann(properties=big))
    with pytest.raises(ConfigError, match="reserved"):
        _encode_txt(ann(properties={"Role": "x"}))
    with pytest.raises(ConfigError, match=r"RFC 6763 §6\.4"):
        _encode_txt(ann(properties={"a=b": "x"}))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"txtvers": None}, "no txtvers"),
        ({"txtvers": "9"}, "txtvers='9'"),
        ({"proto": "x"}, "proto='x' is not a number"),
        ({"proto": "99"}, "protocol 99"),
        ({"node": None}, "no node"),
        ({"role": "boss"}, "role='boss'"),
        ({"service": ""}, "service= is empty"),
        ({"socket": "TCP"}, "socket='TCP'"),
        ({"transport": "udp"}, "transport='udp'"),
        ({"curve": "short"}, "z85"),
    ],
)
def test_malformed_txt_is_rejected_with_reason(change: dict[str, str | None], reason: str) -> None:
    props: dict[bytes, bytes | None] = as_props(_encode_txt(ann()))
    for key, value in change.items():
        if value is None:
            props.pop(key.encode())
        else:
            props[key.encode()] = value.encode()
    with pytest.raises(_BadRecord, match=reason):
        _decode_txt(props, 5555)


def test_bad_port_and_non_utf8_are_rejected() -> None:
    props = as_props(_encode_txt(ann()))
    with pytest.raises(_BadRecord, match="port"):
        _decode_txt(props, 0)
    props[b"service"] = b"\xff"
    with pytest.raises(_BadRecord, match="UTF-8"):
        _decode_txt(props, 5555)


def test_labels_default_rename_and_limits() -> None:
    label = _default_label("orders", "worker", "0123456789abcdef", 5555)
    assert label == "orders worker 01234567 5555"
    long = _default_label("x" * 100, "worker", "n", 1)
    assert len(long.encode()) <= 63 and long.endswith(" worker n 1")
    assert _renamed("dup", 2) == "dup (2)"
    assert _renamed("dup (2)", 3) == "dup (3)"
    assert len(_renamed("y" * 63, 12).encode()) == 63
    with pytest.raises(ConfigError, match="63"):
        _check_label("z" * 64)
    with pytest.raises(ConfigError, match=r"'\.'"):
        _check_label("a.b")


def test_endpoints_ranked_local_subnet_then_ipv4() -> None:
    nets = [ipaddress.ip_network("10.1.0.0/24")]
    ranked = _rank_endpoints(
        ["fd00::5", "192.168.9.9", "127.0.0.1", "10.1.0.7", "fe80::1%3", "0.0.0.0"], 7, nets
    )
    assert ranked == (
        "tcp://10.1.0.7:7",
        "tcp://192.168.9.9:7",
        "tcp://[fd00::5]:7",
        "tcp://[fe80::1%3]:7",
        "tcp://127.0.0.1:7",
    )


def test_peer_from_records_and_service_info() -> None:
    a = ann(public_key=KEY)
    info = _service_info(a, "orders worker n1 5555", "h.local.", ["10.0.0.2"], 120)
    assert info.type == SERVICE_TYPE
    assert info.name == f"orders worker n1 5555.{SERVICE_TYPE}"
    assert info.host_ttl == 120 and info.other_ttl == 120
    sub = _service_info(a, "x", "h.local.", ["10.0.0.2"], 120, _subtype("worker"))
    assert sub.type == f"_worker._sub.{SERVICE_TYPE}" and sub.name == f"x.{SERVICE_TYPE}"
    peer = _peer_from("x", info.properties, info.port, "h.local.", info.parsed_addresses())
    assert peer.endpoint == "tcp://10.0.0.2:5555"
    assert (peer.service, peer.role, peer.node_id, peer.public_key) == (
        "orders",
        "worker",
        "n1",
        KEY,
    )
    assert peer.same_as(msgspec.structs.replace(peer, first_seen=42.0))
    assert not peer.same_as(msgspec.structs.replace(peer, port=1))
    with pytest.raises(_BadRecord, match="address"):
        _peer_from("x", info.properties, info.port, "h.local.", [])


def test_every_role_has_a_subtype_and_default_socket() -> None:
    from discovery import DEFAULT_SOCKET_TYPES, SOCKET_TYPES

    for role in ROLES:
        assert DEFAULT_SOCKET_TYPES[role] in SOCKET_TYPES
        assert _subtype(role).startswith(f"_{role}._sub.")


def test_interfaces_by_address_and_name() -> None:
    loop = _resolve_interfaces(["127.0.0.1"], None)
    assert loop.choice == ["127.0.0.1"]
    assert loop.addresses == ("127.0.0.1",)  # loopback announced when it is all we have
    assert loop.v4_sources == ("127.0.0.1",)
    by_name = _resolve_interfaces(["lo"], None)
    assert isinstance(by_name.choice, list) and "127.0.0.1" in by_name.choice
    with pytest.raises(ConfigError, match="no network interface 'nope0'; this host has"):
        _resolve_interfaces(["nope0"], None)
    with pytest.raises(ConfigError, match="ip_version"):
        _resolve_interfaces(None, "v5")  # type: ignore[arg-type]
    everything = _resolve_interfaces(None, None)
    assert all(":" not in a for a in everything.addresses)  # v4 only by default
