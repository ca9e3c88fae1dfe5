"""Signed URLs for the GitHub Actions cache's uploads and downloads.

``@actions/cache`` sends no credentials to the URLs the cache service hands out, so each URL
carries its own: an expiry and an HMAC-SHA256, under a key kept in ``gha.key`` in the state
directory, over what the URL may do (upload or download) and to which entry. The path has the
``/<account>/<container>/<blob>`` shape the Azure SDK insists on for an IP host:
``/gha/upload/<id>`` or ``/gha/download/<id>``.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path
from urllib.parse import urlencode

from ...errors import AuthError, StoreMisconfigured

KEY_FILE = "gha.key"
ACCOUNT = "gha"
OPS = ("upload", "download")


class UrlSigner:
    """Makes and checks signed URLs with the server's own key."""

    def __init__(self, state_dir: Path) -> None:
        self.key = _load_key(state_dir / KEY_FILE)

    def _sig(self, op: str, entry_id: int, expires: int) -> str:
        msg = f"{op}\n{entry_id}\n{expires}".encode()
        return hmac.new(self.key, msg, hashlib.sha256).hexdigest()

    def url(self, base: str, op: str, entry_id: int, ttl: float) -> str:
        """An absolute URL under ``base`` letting its holder ``op`` entry ``entry_id`` for
        ``ttl`` seconds."""
        expires = int(time.time() + ttl)
        query = urlencode({"exp": expires, "sig": self._sig(op, entry_id, expires)})
        return f"{base.rstrip('/')}/{ACCOUNT}/{op}/{entry_id}?{query}"

    def check(self, op: str, entry_id: int, expires: str | None, sig: str | None,
              now: float | None = None) -> None:
        """Raise ``AuthError`` unless the signature is ours for this operation and entry and
        has not expired."""
        if not expires or not sig or not expires.isdigit():
            raise AuthError("this URL is not signed; ask the cache service for a new one")
        if not hmac.compare_digest(self._sig(op, entry_id, int(expires)), sig):
            raise AuthError("this URL's signature is not valid for it; ask the cache service "
                            "for a new one")
        if int(expires) <= (now or time.time()):
            raise AuthError("this signed URL has expired; ask the cache service for a new one")


def _load_key(path: Path) -> bytes:
    """The signing key, made on first use (0600; only its holder can mint URLs)."""
    with contextlib.suppress(FileNotFoundError):
        return _read(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
        f.flush()
        os.fsync(f.fileno())
    # Two servers starting at once over one state directory: the first link wins, both use it.
    with contextlib.suppress(FileExistsError):
        os.link(tmp, path)
    tmp.unlink()
    return _read(path)


def _read(path: Path) -> bytes:
    text = path.read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 32:
        raise StoreMisconfigured(f"{path} is not a signing key (64 hex digits); delete it and "
                                 "restart stickyci serve (signed URLs in flight stop working)",
                                 summary="the server's signing key is unreadable")
    return key
