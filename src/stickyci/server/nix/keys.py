"""The signing keys of the Nix caches: one ed25519 key per cache, in Nix's ``name:base64`` form.

A cache's secret key lives in ``nix-keys/<cache>.secret`` under the server's state directory,
mode 0600; it never leaves that file except as signatures (the public half is printed for
``trusted-public-keys``). Keys are named ``<cache>-<n>``; rotating writes ``n + 1`` and the
server signs with it from its next request on, since it signs every narinfo as it serves it.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from ...errors import NotFound, StoreMisconfigured, UsageError

KEY_DIR = "nix-keys"
CACHE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")
_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")


def check_cache(name: str) -> str:
    """``name`` if it can name a Nix cache, else ``UsageError``."""
    if not CACHE_NAME.fullmatch(name):
        raise UsageError(f"Nix cache name {name[:120]!r}: use letters, digits, '_' and '-' "
                         "(at most 100)")
    return name


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A cache's key pair; ``repr`` shows only the public half."""

    name: str
    private: Ed25519PrivateKey

    @property
    def public(self) -> str:
        """``name:base64(public key)``, the form ``trusted-public-keys`` takes."""
        raw = self.private.public_key().public_bytes_raw()
        return f"{self.name}:{base64.b64encode(raw).decode()}"

    def sign(self, fingerprint: bytes) -> str:
        """A ``Sig:`` value over ``fingerprint``."""
        return f"{self.name}:{base64.b64encode(self.private.sign(fingerprint)).decode()}"

    def secret_text(self) -> str:
        """Nix's secret key form: ``name:base64(seed + public key)``."""
        seed = self.private.private_bytes_raw()
        pub = self.private.public_key().public_bytes_raw()
        return f"{self.name}:{base64.b64encode(seed + pub).decode()}"

    def __repr__(self) -> str:
        return f"SigningKey({self.public!r})"


def verify(public: str, fingerprint: bytes, sig: str) -> bool:
    """Whether ``sig`` (``name:base64``) is ``public``'s signature of ``fingerprint``."""
    name, _, key64 = public.partition(":")
    sig_name, _, sig64 = sig.partition(":")
    if name != sig_name:
        return False
    try:
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(key64, validate=True))
        key.verify(base64.b64decode(sig64, validate=True), fingerprint)
    except (ValueError, binascii.Error, InvalidSignature):
        return False
    return True


def parse_secret(text: str, where: str) -> SigningKey:
    """A secret key in Nix's form; ``StoreMisconfigured`` (never echoing it) if malformed."""
    name, _, key64 = text.strip().partition(":")
    try:
        raw = base64.b64decode(key64, validate=True)
        if not _KEY_NAME.fullmatch(name) or len(raw) != 64:
            raise ValueError("not name:base64(64 bytes)")
        private = Ed25519PrivateKey.from_private_bytes(raw[:32])
        if private.public_key().public_bytes_raw() != raw[32:]:
            raise ValueError("its public half does not match")
    except (ValueError, binascii.Error) as exc:
        raise StoreMisconfigured(f"Nix signing key {where} is malformed ({exc}); rotate it "
                                 "with stickyci nix key rotate",
                                 summary="a Nix cache's signing key is unreadable") from None
    return SigningKey(name, private)


class KeyRing:
    """The caches' keys under a state directory, re-read when a key file changes."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / KEY_DIR
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[tuple[int, int], SigningKey]] = {}

    def _path(self, cache: str) -> Path:
        return self.dir / f"{check_cache(cache)}.secret"

    def get(self, cache: str) -> SigningKey | None:
        """The cache's key, or None if it has none yet."""
        path = self._path(cache)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        stamp = (st.st_ino, st.st_mtime_ns)
        with self._lock:
            cached = self._cache.get(cache)
            if cached and cached[0] == stamp:
                return cached[1]
        key = parse_secret(path.read_text(), str(path))
        with self._lock:
            self._cache[cache] = (stamp, key)
        return key

    def require(self, cache: str) -> SigningKey:
        """The cache's key; ``NotFound`` naming the command that makes one."""
        key = self.get(cache)
        if key is None:
            raise NotFound(f"Nix cache {cache} has no signing key; create one with "
                           f"stickyci nix key generate {cache}")
        return key

    def ensure(self, cache: str) -> SigningKey:
        """The cache's key, generated on first use."""
        return self.get(cache) or self._write(cache, 1, exclusive=True)

    def rotate(self, cache: str) -> SigningKey:
        """Replace the cache's key with a new one, named with the next number."""
        old = self.require(cache)
        number = old.name.rpartition("-")[2]
        return self._write(cache, int(number) + 1 if number.isdigit() else 1, exclusive=False)

    def _write(self, cache: str, number: int, *, exclusive: bool) -> SigningKey:
        key = SigningKey(f"{cache}-{number}", Ed25519PrivateKey.generate())
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self._path(cache)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key.secret_text() + "\n")
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            try:
                os.link(tmp, path)  # another generator got there first: keep its key
            except FileExistsError:
                os.unlink(tmp)
                return self.require(cache)
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
        return key
