"""The content-addressed store: backends, packs of objects, and opening a store by URL."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlparse

from ..errors import UsageError
from ..paths import cache_home
from ..units import parse_size
from .backend import Backend, Stat
from .local import LocalBackend
from .objects import ObjectStore

DEFAULT_TIER_SIZE = "10G"

__all__ = ["Backend", "LocalBackend", "ObjectStore", "Stat", "open_backend"]


def default_store_url() -> str:
    """``STICKYCI_STORE``, else a ``file://`` store under the cache directory."""
    return os.environ.get("STICKYCI_STORE") or f"file://{cache_home() / 'store'}"


def open_backend(url: str | None = None) -> Backend:
    """Open the backend a URL names: ``file:///path``, a plain path, ``s3://BUCKET/PREFIX``,
    or ``http://HOST:PORT`` (a stickyci server, read through a local tier of
    ``STICKYCI_TIER_SIZE`` bytes unless ``STICKYCI_TIER=off``)."""
    url = url or default_store_url()
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme else url
        if not path:
            raise UsageError(f"store URL {url!r} has no path; use file:///absolute/path")
        return LocalBackend(Path(path).expanduser().absolute())
    if parsed.scheme in ("http", "https"):
        from .http import HttpBackend
        from .tier import TieredBackend

        remote = HttpBackend(url)
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
