"""The CURVE flags every CLI tool shares, and the CurveOptions they mean.

A tool that binds a server socket calls `add_curve_arguments(p, server=True)`
and `server_curve_from_args(args)`; a tool that connects calls
`add_curve_arguments(p, client=True)` and `client_curve_from_args(args)`;
a tool that does both passes both flags. `--trust DIR` is for connections by
`--service NAME`: announced server keys not in DIR are ignored.

Who takes what: `pub`, `sub`, `push`, `pull` take all four (which ones apply
depends on --bind or --connect); `reply` and `queue` bind, so they take
--secret-key and --allow (a queue uses its one key pair on both ROUTERs and
its --allow DIR admits clients and workers alike); `req` and `worker`
connect, so they take --secret-key, --server-key and --trust.
"""

from __future__ import annotations

import argparse

from .._errors import ConfigError
from .._security import TrustStore, client_curve, server_curve
from .._sockets import CurveOptions

__all__ = [
    "add_curve_arguments",
    "client_curve_from_args",
    "server_curve_from_args",
    "trust_store_from_args",
]


def add_curve_arguments(
    parser: argparse.ArgumentParser,
    *,
    server: bool = False,
    client: bool = False,
    peers: str = "clients",
    binds: str = "the sockets it binds",
) -> None:
    """Add --secret-key, and --allow (server) / --server-key and --trust (client).

    `peers` and `binds` word the help: who --allow admits, which sockets it covers.
    """
    group = parser.add_argument_group(
        "CURVE security", "encrypt and authenticate (make keys with 'zmqmesh keygen NAME')"
    )
    group.add_argument(
        "--secret-key",
        metavar="FILE",
        help="this side's NAME.key_secret; turns CURVE on"
        + (f" for {binds}" if server and not client else ""),
    )
    if server:
        group.add_argument(
            "--allow",
            metavar="DIR",
            help=f"admit only {peers} whose NAME.key is in DIR (needs --secret-key)",
        )
    if client:
        group.add_argument(
            "--server-key",
            metavar="KEY|FILE",
            help="the server's public key (Z85 text or its NAME.key file); turns CURVE on "
            "for connections (an ephemeral key pair is used without --secret-key). Write "
            "--server-key=KEY: a Z85 key may start with '-'",
        )
        group.add_argument(
            "--trust",
            metavar="DIR",
            help="with --service: accept only announced server keys found in DIR",
        )


def server_curve_from_args(args: argparse.Namespace) -> CurveOptions | None:
    """CurveOptions for the sockets a tool binds, or None for plain text."""
    secret = getattr(args, "secret_key", None)
    allow = getattr(args, "allow", None)
    if secret is None:
        if allow is not None:
            raise ConfigError("--allow needs --secret-key (the server's own key pair)")
        return None
    return server_curve(secret, allow=allow)


def client_curve_from_args(
    args: argparse.Namespace, server_key: str | bytes | None = None
) -> CurveOptions | None:
    """CurveOptions for the sockets a tool connects, or None for plain text.

    `server_key` is a key learnt another way (an mDNS announcement); it is
    used when --server-key is not given.
    """
    key = getattr(args, "server_key", None) or server_key
    secret = getattr(args, "secret_key", None)
    if getattr(args, "trust", None) and not getattr(args, "service", None):
        # Without --service there is no announced key for DIR to vet: refuse
        # rather than connect in plain text.
        raise ConfigError(
            "--trust DIR vets the keys announced with --service NAME; with --connect "
            "give the server's key with --server-key"
        )
    if key is None:
        if secret is not None and not hasattr(args, "allow"):
            raise ConfigError(
                "--secret-key on a connecting tool needs --server-key (or --service, "
                "whose announcement carries the key)"
            )
        return None
    return client_curve(secret, key)


def trust_store_from_args(args: argparse.Namespace) -> TrustStore | None:
    """The --trust directory as a TrustStore, or None to accept any announced key."""
    trust = getattr(args, "trust", None)
    return TrustStore(trust) if trust is not None else None
