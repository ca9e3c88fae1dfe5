"""Least-recently-used accounting of the size-bounded cache entries (Bazel's, and the Nix
binary cache's narinfos and NAR pins), for ``serve --max-size``.

The order lives in memory: at start-up it is seeded from the store's modification times, then
every hit and upload moves an entry to the young end. Losing it on restart costs only a less
precise eviction order, never data, so it is not persisted.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from ..store import Backend

SIZED = ("ac/", "cas/", "nix/", "roots/nix.")
"""The name prefixes of the entries ``--max-size`` bounds."""
LOW_WATER = 0.9
"""Evict down to this share of the limit, so one eviction pass serves many uploads."""


class CacheLRU:
    """Sizes of cache entries in use order; ``over()`` says what to evict."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.total = 0
        self._order: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def seed(self, backend: Backend) -> None:
        """Learn the entries already stored, oldest first by modification time."""
        found = []
        for prefix in SIZED:
            for name in backend.list(prefix.partition("/")[0]):
                if not name.startswith(prefix):
                    continue
                st = backend.stat(name)
                if st is not None:
                    found.append((st.mtime, name, st.size))
        with self._lock:
            # Each goes to the old end, so walk newest first: the oldest ends up evicted first.
            for _, name, size in sorted(found, reverse=True):
                if name not in self._order:
                    self._order[name] = size
                    self._order.move_to_end(name, last=False)
                    self.total += size

    def touch(self, name: str, size: int) -> None:
        """Record a hit or an upload of ``name``."""
        if self.limit is None:
            return  # nothing will ever be evicted: don't grow a dict per entry ever stored
        with self._lock:
            old = self._order.pop(name, None)
            self.total += size - (old or 0)
            self._order[name] = size

    def forget(self, name: str) -> None:
        """Drop an entry that is gone from the store."""
        with self._lock:
            self.total -= self._order.pop(name, 0)

    def over(self) -> list[str]:
        """Claim the oldest entries to evict to get back under the limit (none if under it).

        They leave the accounting here, under the lock, so concurrent uploads each get their
        own victims and an entry is never evicted (or counted as evicted) twice.
        """
        victims: list[str] = []
        with self._lock:
            if self.limit is None or self.total <= self.limit:
                return victims
            target = int(self.limit * LOW_WATER)
            while self._order and self.total > target:
                name, size = self._order.popitem(last=False)
                victims.append(name)
                self.total -= size
        return victims
