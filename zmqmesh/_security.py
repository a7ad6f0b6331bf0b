"""CURVE keys and allow-lists (ZeroMQ RFC 26 CurveZMQ, RFC 32 Z85).

Keys live in ZeroMQ's certificate format, the one `zmq.auth` (and czmq's
zcert) reads and writes: `NAME.key` holds the public key and may be shared,
`NAME.key_secret` holds both keys and stays private. An allow-list is a
directory of client `NAME.key` files (czmq's convention). Everything that
reads a key checks its Z85 form and raises `ConfigError` naming the file.

The ZAP side (RFC 27: who may connect to a CURVE server) is in `_zap.py`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import zmq
import zmq.auth

from ._clock import Clock, MonotonicClock
from ._errors import ConfigError
from ._sockets import CurveOptions

__all__ = [
    "Certificate",
    "KeyPair",
    "TrustStore",
    "client_curve",
    "load_keypair",
    "load_public_key",
    "server_curve",
    "validate_key",
    "write_certificate",
]

log = logging.getLogger("zmqmesh.security")

PathArg = str | os.PathLike[str]

# Z85 (RFC 32): 85 printable characters, 5 characters per 4 bytes, so a
# 32-byte CURVE key is 40 characters.
_Z85: Final = (
    b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
)
_Z85_VALUE: Final = {c: i for i, c in enumerate(_Z85)}
_KEY_LEN: Final = 40
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@+-]{0,127}$")
_KEYGEN_HINT: Final = "create one with 'zmqmesh keygen NAME'"


def _require_curve() -> None:
    if not zmq.has("curve"):
        raise ConfigError(
            f"libzmq {zmq.zmq_version()} was built without CURVE support; "
            "install pyzmq's wheels from PyPI (they bundle libsodium-backed CURVE)"
        )


def validate_key(key: str | bytes, what: str = "CURVE key") -> bytes:
    """Check a Z85-encoded 32-byte CURVE key and return it as bytes.

    `what` names the key in the error (a file, a config key), for example
    ``validate_key(k, "server key in relay.toml")``.
    """
    if isinstance(key, str):
        try:
            raw = key.strip().encode("ascii")
        except UnicodeEncodeError:
            raise ConfigError(f"{what}: not a Z85 key (it has non-ASCII characters)") from None
    elif isinstance(key, bytes | bytearray | memoryview):
        raw = bytes(key).strip()
    else:
        raise ConfigError(f"{what}: expected a Z85 key (str or bytes), got {type(key).__name__}")
    if len(raw) != _KEY_LEN:
        raise ConfigError(
            f"{what}: a CURVE key is {_KEY_LEN} Z85 characters, this one has {len(raw)}"
        )
    bad = [c for c in raw if c not in _Z85_VALUE]
    if bad:
        raise ConfigError(f"{what}: {chr(bad[0])!r} is not a Z85 character")
    for i in range(0, _KEY_LEN, 5):
        value = 0
        for c in raw[i : i + 5]:
            value = value * 85 + _Z85_VALUE[c]
        if value >= 1 << 32:  # libzmq's decoder rejects such a group too
            raise ConfigError(f"{what}: {raw[i : i + 5].decode()!r} is not valid Z85")
    return raw


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A CURVE key pair, both keys Z85-encoded (the secret one never in repr)."""

    public: bytes
    secret: bytes = field(repr=False)

    @classmethod
    def generate(cls) -> KeyPair:
        """A fresh pair (for example an ephemeral client identity)."""
        _require_curve()
        public, secret = zmq.curve_keypair()
        return cls(public, secret)


@dataclass(frozen=True, slots=True)
class Certificate:
    """What `write_certificate` wrote."""

    name: str
    public_key: bytes
    public_file: Path
    secret_file: Path


def _read_certificate(path: Path, what: str) -> tuple[bytes, bytes | None]:
    if not path.exists():
        raise ConfigError(f"{what} {path}: not found; {_KEYGEN_HINT}")
    if not path.is_file():
        raise ConfigError(f"{what} {path}: is not a file")
    try:
        return zmq.auth.load_certificate(path)
    except ValueError:
        raise ConfigError(
            f"{what} {path}: no public-key line; expected a ZeroMQ certificate "
            f"as written by 'zmqmesh keygen'"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read it: {exc.strerror or exc}") from None


def _warn_if_exposed(path: Path) -> None:
    # Like ssh: a secret key readable by others is still used, but said out loud.
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if os.name == "posix" and mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning(
            "CURVE secret key file %s is readable by other users (mode %o); run 'chmod 600 %s'",
            path,
            stat.S_IMODE(mode),
            path,
        )


def load_keypair(path: PathArg) -> KeyPair:
    """Read `NAME.key_secret` (both keys) and check that they belong together."""
    _require_curve()
    p = Path(path)
    what = "CURVE secret key file"
    public, secret = _read_certificate(p, what)
    pub = validate_key(public, f"{what} {p}: public-key")
    if secret is None:
        raise ConfigError(
            f"{what} {p}: holds only a public key; pass the NAME.key_secret file "
            "written by 'zmqmesh keygen'"
        )
    sec = validate_key(secret, f"{what} {p}: secret-key")
    if zmq.curve_public(sec) != pub:
        raise ConfigError(
            f"{what} {p}: its public key does not belong to its secret key; "
            "the file was edited or mixed up, generate a new pair with 'zmqmesh keygen'"
        )
    _warn_if_exposed(p)
    return KeyPair(pub, sec)


def load_public_key(source: str | bytes | os.PathLike[str]) -> bytes:
    """A public key from a Z85 string/bytes or from a certificate file.

    A `str` that names an existing file is read as a file (`NAME.key` or
    `NAME.key_secret`); otherwise a 40-character `str` is taken as the key.
    """
    if isinstance(source, bytes | bytearray):
        return validate_key(bytes(source), "CURVE public key")
    if isinstance(source, str) and len(source.strip()) == _KEY_LEN and not os.path.exists(source):
        return validate_key(source, "CURVE public key")
    p = Path(source)
    what = "CURVE public key file"
    public, _ = _read_certificate(p, what)
    return validate_key(public, f"{what} {p}: public-key")


def write_certificate(directory: PathArg, name: str, *, force: bool = False) -> Certificate:
    """Write `DIR/NAME.key` and `DIR/NAME.key_secret` (ZeroMQ's certificate format).

    Refuses to replace an existing key of that name unless `force`. The files
    are written under a private temporary name and renamed into place, so a
    crash never leaves a half-written key, and the secret file is mode 0600.
    """
    _require_curve()
    if not _NAME_RE.match(name):
        raise ConfigError(
            f"key name {name!r}: use letters, digits and . _ @ + - (no path separators), "
            "starting with a letter, digit or underscore"
        )
    out = Path(directory)
    public_file, secret_file = out / f"{name}.key", out / f"{name}.key_secret"
    if not force:
        for existing in (secret_file, public_file):
            if existing.exists():
                raise ConfigError(
                    f"{existing}: a key named {name!r} already exists; refusing to "
                    "overwrite it (use --force / force=True; holders of the old "
                    "public key will then be refused)"
                )
    try:
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = Path(tempfile.mkdtemp(prefix=".keygen-", dir=out))
        try:
            tmp_public, tmp_secret = zmq.auth.create_certificates(tmp, name)
            os.chmod(tmp_secret, 0o600)
            os.chmod(tmp_public, 0o644)
            os.replace(tmp_secret, secret_file)
            os.replace(tmp_public, public_file)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        where = exc.filename or out
        raise ConfigError(f"cannot write keys to {where}: {exc.strerror or exc}") from None
    public, _ = zmq.auth.load_certificate(public_file)
    return Certificate(name, public, public_file, secret_file)


class TrustStore:
    """A set of trusted CURVE public keys: an allow-list directory and/or fixed keys.

    The directory holds client `NAME.key` files (czmq's convention; secret
    files there are ignored). It is read again at most every
    `rescan_interval` seconds while keys are being checked, so adding a file
    admits a client and deleting one revokes it (for new connections) without
    a restart. Thread-safe: the ZAP thread and discovery may both ask.
    """

    __slots__ = ("_bad", "_clock", "_dir", "_extra", "_interval", "_keys", "_lock", "_scanned")

    def __init__(
        self,
        directory: PathArg | None = None,
        *,
        keys: Iterable[str | bytes] = (),
        rescan_interval: float = 1.0,
        clock: Clock | None = None,
    ) -> None:
        _require_curve()
        self._extra = frozenset(validate_key(k, "trusted CURVE key") for k in keys)
        self._dir = Path(directory) if directory is not None else None
        self._interval = rescan_interval
        self._clock: Clock = clock or MonotonicClock()
        self._lock = threading.Lock()
        self._bad: set[tuple[Path, float]] = set()
        if self._dir is not None:
            if not self._dir.exists():
                raise ConfigError(
                    f"allow-list directory {self._dir}: not found; create it and copy "
                    "the clients' NAME.key files into it"
                )
            if not self._dir.is_dir():
                raise ConfigError(f"allow-list directory {self._dir}: is not a directory")
        self._keys = self._extra | self._scan(strict=True)
        self._scanned = self._clock.now()
        if not self._keys:
            log.warning(
                "allow-list %s is empty: every client will be refused until a NAME.key "
                "file is added",
                self,
            )

    @property
    def directory(self) -> Path | None:
        return self._dir

    @property
    def keys(self) -> frozenset[bytes]:
        """The trusted keys as of the last scan (Z85 bytes)."""
        return self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str | bytes) and self.is_trusted(key)

    def __repr__(self) -> str:
        return f"TrustStore({str(self._dir) if self._dir else '<fixed keys>'!r})"

    def __str__(self) -> str:
        return str(self._dir) if self._dir is not None else "<fixed keys>"

    def is_trusted(self, key: str | bytes) -> bool:
        """True if `key` (Z85) is trusted; malformed keys are simply not trusted."""
        try:
            k = validate_key(key)
        except ConfigError:
            return False
        if self._dir is not None and self._clock.now() - self._scanned >= self._interval:
            self.rescan()
        return k in self._keys

    def rescan(self) -> frozenset[bytes]:
        """Read the directory again now; a bad file is logged once and skipped."""
        with self._lock:
            self._keys = self._extra | self._scan(strict=False)
            self._scanned = self._clock.now()
            return self._keys

    def _scan(self, *, strict: bool) -> frozenset[bytes]:
        if self._dir is None:
            return frozenset()
        found: set[bytes] = set()
        try:
            files = sorted(self._dir.glob("*.key"))
        except OSError as exc:
            if strict:
                raise ConfigError(
                    f"allow-list directory {self._dir}: cannot list it: {exc.strerror}"
                ) from None
            log.warning("allow-list %s: cannot list it: %s; keeping old keys", self, exc)
            return self._keys - self._extra
        for path in files:
            try:
                found.add(load_public_key(path))
            except ConfigError as exc:
                if strict:
                    raise
                mark = (path, _mtime(path))
                if mark not in self._bad:
                    self._bad.add(mark)
                    log.warning("%s; skipping that file", exc)
        return frozenset(found)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _keypair(keys: KeyPair | PathArg) -> KeyPair:
    return keys if isinstance(keys, KeyPair) else load_keypair(keys)


def server_curve(
    keys: KeyPair | PathArg, *, allow: TrustStore | PathArg | None = None
) -> CurveOptions:
    """CurveOptions for a CURVE server: its key pair (or `NAME.key_secret`) and
    an optional allow-list (a `TrustStore` or a directory of client `.key` files).

    Without `allow`, any client that knows the server's public key may connect.
    With it, the socket must be guarded with `guard_server` before bind.
    """
    pair = _keypair(keys)
    store = allow if isinstance(allow, TrustStore) or allow is None else TrustStore(allow)
    return CurveOptions(pair.public, pair.secret, server=True, allow=store)


def client_curve(
    keys: KeyPair | PathArg | None, server_key: str | bytes | os.PathLike[str]
) -> CurveOptions:
    """CurveOptions for a CURVE client: its key pair (a `KeyPair`, a
    `NAME.key_secret` file, or None for a fresh ephemeral pair, enough for a
    server without an allow-list) and the server's public key (Z85 or a file).
    """
    pair = KeyPair.generate() if keys is None else _keypair(keys)
    return CurveOptions(pair.public, pair.secret, server_key=load_public_key(server_key))
