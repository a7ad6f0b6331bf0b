"""`zmqmesh keygen [--out DIR] [--force] NAME`: a CURVE key pair in ZeroMQ's certificate format."""

from __future__ import annotations

import argparse

from .._security import write_certificate


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "keygen",
        help="create a CURVE key pair (NAME.key public, NAME.key_secret secret)",
        description="Write a CURVE key pair in ZeroMQ's certificate format (the one "
        "pyzmq's zmq.auth and czmq read): DIR/NAME.key holds the public key, to share "
        "(a server's, for its clients; a client's, for a server's allow-list directory); "
        "DIR/NAME.key_secret holds the secret key (mode 0600), to keep. Prints the "
        "public key and both paths.",
    )
    parser.add_argument("name", metavar="NAME", help="base name of the two files")
    parser.add_argument(
        "--out", metavar="DIR", default=".", help="directory to write to (default: .)"
    )
    parser.add_argument(
        "--force", action="store_true", help="replace an existing key pair of that name"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cert = write_certificate(args.out, args.name, force=args.force)
    print(f"public key:      {cert.public_key.decode()}")
    print(f"public key file: {cert.public_file}  (share it)")
    print(f"secret key file: {cert.secret_file}  (keep it private)")
    return 0
