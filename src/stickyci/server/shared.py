"""What the worker processes of ``stickyci serve --workers N`` share, seen from one worker.

A worker keeps caches of state that another worker may change: the refs a filtered token's
visibility is computed from, the GitHub Actions cache entries. ``Changes`` is a row of
counters in memory shared by every worker (made by the supervisor, ``workers.py``): a worker
that changes such state bumps its counter, and every worker compares the counters with what it
last saw before it answers a request, so a change made through one worker is seen by the next
request through any other. The Bazel and Nix cache accounting for ``--max-size`` lives in the
supervisor alone (one use order, one eviction); ``RemoteLRU`` sends it every hit, upload and
disappearance with the time it happened, so the supervisor can put what several workers sent
meanwhile back in the order it happened.
"""

from __future__ import annotations

import enum
import struct
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

_HEAD = struct.Struct("<qq")
"""When (CLOCK_MONOTONIC, the same clock in every process) and the size."""


class Change(enum.IntEnum):
    """What a counter of ``Changes`` counts changes of."""

    REFS = 0
    GHA = 1


class Changes:
    """One counter per ``Change``, in memory shared by the workers (or private to one)."""

    def __init__(self, counters: Any = None, lock: Any = None) -> None:
        # A multiprocessing RawArray of longs and a multiprocessing Lock shared with the
        # other workers, or private ones.
        self._counters = counters if counters is not None else [0] * len(Change)
        self._lock = lock if lock is not None else threading.Lock()
        self._seen = [self._counters[c] for c in Change]

    def bump(self, what: Change) -> None:
        """Say that this worker changed ``what``."""
        with self._lock:  # across processes: two bumps must give two values
            old = self._counters[what]
            self._counters[what] = old + 1
        if self._seen[what] == old:
            # Nothing else changed since this worker looked: its own change needs no news.
            # Otherwise it stays unseen, so the other worker's change is still noticed.
            self._seen[what] = old + 1

    def changed(self, what: Change) -> bool:
        """Whether another worker changed ``what`` since this one last asked (or bumped)."""
        value = self._counters[what]
        if value == self._seen[what]:
            return False
        self._seen[what] = value
        return True


@dataclass(frozen=True)
class Shared:
    """What a worker is handed by the supervisor: its index, the shared counters and, with
    ``--max-size``, its link to the cache accounting."""

    index: int
    changes: Changes
    lru: Connection | None = None

    @property
    def primary(self) -> bool:
        """Whether this worker runs what must run once per server (the eviction schedule,
        the store's size in the history)."""
        return self.index == 0


TOUCH, FORGET = b"t", b"f"
"""The LRU messages: the kind, when and size (8 bytes each), the name."""


class RemoteLRU:
    """A worker's side of the supervisor's ``CacheLRU``: the same calls the APIs make on a
    local one, sent on; the supervisor evicts, so ``over`` never names anything here."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._lock = threading.Lock()  # a Connection is not safe to share between threads

    def seed(self, *_: object) -> None:
        """The supervisor seeds the one accounting."""

    def touch(self, name: str, size: int) -> None:
        """Record a hit or an upload of ``name``."""
        self._send(TOUCH, name, size)

    def forget(self, name: str) -> None:
        """Drop an entry that is gone from the store."""
        self._send(FORGET, name, 0)

    def over(self) -> list[str]:
        """Nothing: the supervisor evicts once the cache is over ``--max-size``."""
        return []

    def _send(self, kind: bytes, name: str, size: int) -> None:
        with self._lock:
            self.conn.send_bytes(kind + _HEAD.pack(time.monotonic_ns(), size) + name.encode())


def decode(message: bytes) -> tuple[int, bytes, str, int]:
    """A ``RemoteLRU`` message as (when, kind, name, size)."""
    when, size = _HEAD.unpack_from(message, 1)
    return when, message[:1], message[1 + _HEAD.size:].decode(), size
