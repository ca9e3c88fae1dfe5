"""The content-addressed store: backends, packs of objects, and opening a store by URL.

A store is named by a **store URL** (``file://``, ``s3://``, ``http://``), opened as a
:class:`Backend` (blobs by name), and read as objects through an :class:`ObjectStore` (packs
and their indexes over a backend). The wire format the ``http://`` backend and the server
share is the public submodule :mod:`.protocol`, imported on its own (it needs pydantic).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlparse

from ..errors import UsageError
from ..paths import cache_home
from ..units import parse_size
from .backend import Backend, Stat, check_name
from .local import LocalBackend
from .objects import (
    IndexEntry,
    Location,
    ObjectStore,
    decode_index,
    encode_index,
    read_at,
    verify_index,
)
from .repack import repack

DEFAULT_TIER_SIZE = "10G"

__all__ = ["Backend", "IndexEntry", "LocalBackend", "Location", "ObjectStore", "Stat",
           "as_backend", "check_name", "decode_index", "default_store_url", "encode_index",
           "open_backend", "read_at", "repack", "verify_index"]


def default_store_url() -> str:
    """``STICKYCI_STORE``, else a ``file://`` store under the cache directory."""
    return os.environ.get("STICKYCI_STORE") or f"file://{cache_home() / 'store'}"


def as_backend(store: str | Backend | None) -> Backend:
    """The backend of a store given by URL (opened), as an open backend (returned as it is),
    or as ``None`` (the default store): how every function that takes ``store`` reads it."""
    return store if store is not None and not isinstance(store, str) else open_backend(store)


def open_backend(url: str | None = None) -> Backend:
    """Open the backend a URL names: ``file:///path``, ``s3://BUCKET/PREFIX``, or
    ``http://HOST:PORT`` (a stickyci server, retried for ``STICKYCI_HTTP_RETRY_SECONDS``
    and read through a local tier of ``STICKYCI_TIER_SIZE`` bytes unless
    ``STICKYCI_TIER=off``). A plain path is refused, naming the ``file://`` URL it may have
    meant: a store given as ``cache/ci`` could as well mean a host, and guessing a directory
    would silently start an empty store there."""
    url = url or default_store_url()
    parsed = urlparse(url)
    if not parsed.scheme:
        where = Path(url).expanduser().absolute()
        raise UsageError(f"store URL {url!r} has no scheme; for a directory, use "
                         f"file://{where}")
    if parsed.scheme == "file":
        path = parsed.path
        if not path:
            raise UsageError(f"store URL {url!r} has no path; use file:///absolute/path")
        return LocalBackend(Path(path).expanduser().absolute())
    if parsed.scheme in ("http", "https"):
        from .http import HttpBackend
        from .retry import RetryBackend
        from .tier import TieredBackend

        # Retries wrap the remote only: the local tier's own failures are not a server away.
        remote = RetryBackend(HttpBackend(url))
        if os.environ.get("STICKYCI_TIER", "on") == "off":
            return remote
        tier = cache_home() / "tier" / re.sub(r"[^A-Za-z0-9.-]", "_", parsed.netloc)
        limit = parse_size(os.environ.get("STICKYCI_TIER_SIZE", DEFAULT_TIER_SIZE))
        return TieredBackend(LocalBackend(tier), remote, limit)
    if parsed.scheme == "s3":
        from .s3 import S3Backend  # boto3 is imported only for s3:// stores (CLI start-up)

        return S3Backend(url)
    raise UsageError(f"store URL {url!r}: unsupported scheme {parsed.scheme!r}; use "
                     "file:///path, s3://BUCKET/PREFIX or http://HOST:PORT")
