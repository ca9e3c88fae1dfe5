"""Tiered reads: a runner's local copy of a remote store, filled on every remote hit.

Packs and indexes are immutable and named by content, so a local copy can never be stale:
reads try the local tier first, and a miss fetches the whole blob once from the remote and
keeps it. Refs change, so they always go to the remote. Writes go to the remote (the shared
truth) and then to the local tier, so a runner reads back what it committed without a download.

A server shows a token only what it may read: a partial index, or a pack with other scopes'
objects zeroed. Those are views, not the blobs, so the tier never keeps them; it keeps a pack
only once it hashes to its name, and reads a redacted pack by ranges from then on.

Retries belong to the remote (``open_backend`` passes a ``RetryBackend``), never to the tier:
a failure of the local copy is not a server away.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

from ..digest import Digest
from ..errors import NotFound, StickyError
from .backend import Backend, Stat
from .local import LocalBackend
from .localindex import scope_of
from .objects import index_is_partial

_IMMUTABLE = ("packs/", "index/")
LOW_WATER = 0.8
"""A trim takes the tier down to this share of its limit, so trims are rare."""


class TieredBackend:
    """``local`` in front of ``remote``, for immutable blobs only."""

    def __init__(self, local: LocalBackend, remote: Backend, limit: int) -> None:
        """Keep at most ``limit`` bytes locally, dropping the least recently used first."""
        self.local = local
        self.remote = remote
        self.url = remote.url
        self.cache_scope = scope_of(remote)
        self.limit = limit
        self._added = 0
        self._touched: set[str] = set()
        self._views: set[str] = set()  # blobs the remote shows this token only in part

    def put(self, name: str, data: bytes | memoryview) -> None:
        """Write through: remote first (the commit is durable there), then local."""
        self.remote.put(name, data)
        if name.startswith(_IMMUTABLE):
            # What this runner committed is read back later if at all (its tree became the
            # base): past the page cache, whose fresh pages cost more system time than the
            # write (a full commit of the 1 GB tree through a server: 0.8 s less).
            self._keep(name, data, cached=False)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Local hit, else fetch the whole blob from the remote, keep it, and slice it."""
        if not name.startswith(_IMMUTABLE):
            return self.remote.get(name, offset, length)
        with contextlib.suppress(NotFound):
            data = self.local.get(name, offset, length)
            if name not in self._touched:  # once per process: the age trim() goes by
                self._touched.add(name)
                with contextlib.suppress(OSError):
                    os.utime(self.local.root / name)
            return data
        if name in self._views:
            return self.remote.get(name, offset, length)
        data = self.remote.get(name)
        if _is_whole(name, data):
            self._keep(name, data, cached=True)  # the rest of the pack is read next
        else:
            self._views.add(name)
        return data[offset:] if length is None else data[offset : offset + length]

    def _keep(self, name: str, data: bytes | memoryview, *, cached: bool) -> None:
        # The local tier is a cache: failing to fill it (a full disk) must not fail the job.
        with contextlib.suppress(StickyError):
            self.local.put(name, data, cached=cached)
            self._added += len(data)
            if self._added > self.limit // 10:
                self._added = 0
                self.trim()

    def trim(self) -> None:
        """Drop the least recently used local blobs while the tier is over its limit."""
        found = []
        for ns in ("packs", "index"):
            with contextlib.suppress(FileNotFoundError), os.scandir(self.local.root / ns) as it:
                for e in it:
                    with contextlib.suppress(FileNotFoundError):
                        st = e.stat()
                        found.append((st.st_mtime, st.st_size, e.path))
        total = sum(size for _, size, _ in found)
        if total <= self.limit:
            return
        for _, size, path in sorted(found):
            if total <= self.limit * LOW_WATER:
                break
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            total -= size

    def stat(self, name: str) -> Stat | None:
        """The remote's answer: a blob gc removed remotely must not look present."""
        return self.remote.stat(name)

    def missing(self, names: Sequence[str]) -> list[str]:
        """The remote's answer."""
        return self.remote.missing(names)

    def list(self, namespace: str) -> list[str]:
        """The remote's listing."""
        return self.remote.list(namespace)

    def delete(self, name: str) -> None:
        """Remove from both tiers."""
        self.remote.delete(name)
        self.local.delete(name)

    def read_versioned(self, name: str) -> tuple[bytes, str] | None:
        """Always the remote: versioned blobs change."""
        return self.remote.read_versioned(name)

    def put_if(self, name: str, data: bytes, etag: str | None) -> bool:
        """Always the remote."""
        return self.remote.put_if(name, data, etag)


def _is_whole(name: str, data: bytes) -> bool:
    """Whether ``data`` is the stored blob ``name``, not a server's view of part of it."""
    if name.startswith("index/"):
        return not index_is_partial(data)
    return Digest.of(data).hex == name.partition("/")[2]
