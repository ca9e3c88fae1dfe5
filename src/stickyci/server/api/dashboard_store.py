"""What the dashboard's pages of the store show: its disks, its caches' use over time, and its
size over time with what each gc reclaimed. The handlers are in ``dashboard.py``; here is what
they compute, with no request in sight.

A token sees what its read patterns cover, as everywhere: the disks whose keys they match (and
the bytes those share among themselves only: sharing with a disk it may not read would tell
it what that disk holds), the Bazel instances and Nix caches they match. What belongs to no
key (the GitHub Actions cache as a whole, the caches counted together past ``MAX_NAMES``,
evictions, the store's size, gc) only a token that sees everything is shown.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass

from ...digest import Digest
from ...disks import DiskRef, scan_refs
from ...errors import IntegrityError, NotFound, UnsafePath
from ...snapshot import load_manifest, validate
from ...store import Backend, ObjectStore
from ...units import format_size
from ..auth import Permission, Principal
from ..history import GcRun, History, Series, StoreSize, minute_of
from ..usage import OVERFLOW, Tally, Use
from ..visibility import sees_everything

log = logging.getLogger("stickyci.server")

MAX_CHUNK_ENTRIES = 2_000_000
"""Most chunk entries the memo of disks' trees holds together (about 200 MB at the limit)."""
WINDOWS = {"1h": (60, 1), "6h": (60, 6), "24h": (48, 30), "7d": (56, 180)}
"""A window of the caches page → its bars, and the minutes of each (whole hours from a day on,
so the history answers from its hourly rows)."""
STORE_WINDOWS = {"24h": 86400.0, "7d": 7 * 86400.0, "30d": 30 * 86400.0,
                 "365d": 365 * 86400.0}
FAMILY_NAMES = {"bazel": "Bazel / ccache", "nix": "Nix", "gha": "GitHub Actions"}
DISK_SORTS = ("key", "size", "shared", "last_used")


# -- disks -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DiskLine:
    """One disk on the disks page: its ref, and the bytes its latest tree shares with the
    other disks shown (None when its tree could not be read)."""

    ref: DiskRef
    shared: int | None

    @property
    def size(self) -> int:
        """The latest tree's size."""
        return self.ref.latest.size if self.ref.latest else 0


class Sharing:
    """Which chunks each disk's latest tree holds (from its manifest, read once per
    snapshot: a snapshot never changes), and so the bytes disks share."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._store = ObjectStore(backend, load_index=False)
        self._lock = threading.Lock()
        self._chunks: OrderedDict[str, dict[bytes, int] | None] = OrderedDict()
        self._entries = 0

    def chunks(self, snapshot: Digest) -> dict[bytes, int] | None:
        """Chunk digest → length of every chunk of a tree; None if it cannot be read."""
        key = snapshot.hex
        with self._lock:
            if key in self._chunks:
                self._chunks.move_to_end(key)
                return self._chunks[key]
        got = self._read(snapshot)
        with self._lock:
            self._chunks[key] = got
            self._entries += len(got or ())
            while self._entries > MAX_CHUNK_ENTRIES and len(self._chunks) > 1:
                self._entries -= len(self._chunks.popitem(last=False)[1] or ())
        return got

    def _read(self, snapshot: Digest) -> dict[bytes, int] | None:
        try:
            try:
                manifest = load_manifest(self._store, snapshot)
            except NotFound:
                # gc may have repacked it since this store read the indexes: look again, once.
                self._store = ObjectStore(self.backend, load_index=False)
                manifest = load_manifest(self._store, snapshot)
            validate(manifest, f"snapshot {snapshot}")
        except (NotFound, IntegrityError, UnsafePath) as exc:
            log.warning("snapshot %s of a disk is unreadable, so its sharing is not shown: %s",
                        snapshot, exc)
            return None
        # validate() checked every chunk reference: 64 hex digits, a length, maybe an offset
        # (a slice of a bundle, told apart from the bundle's other files by it).
        return {bytes.fromhex(ref[0]) + (ref[2].to_bytes(8, "little") if len(ref) == 3 else b""):
                ref[1] for e in manifest.entries.values() for ref in e.chunks}

    def shared(self, found: list[DiskRef]) -> dict[str, int | None]:
        """For each disk, the bytes of its latest tree's chunks that another of ``found``
        holds too (each chunk counted once)."""
        trees = {r.key: self.chunks(r.latest.snapshot) if r.latest else {} for r in found}
        holders = Counter(d for tree in trees.values() for d in tree or ())
        return {key: None if tree is None else sum(n for d, n in tree.items() if holders[d] > 1)
                for key, tree in trees.items()}


def _first(d: DiskLine, sort: str) -> float:
    """What a disk is sorted by first (largest or newest first), before its key."""
    if sort == "size":
        return -d.size
    if sort == "shared":
        return -(d.shared or 0)
    if sort == "last_used":
        return -d.ref.last_used
    return 0.0


@dataclass(frozen=True, slots=True)
class DiskPage:
    """The disks a token may read, and the refs it may read that could not be parsed."""

    disks: list[DiskLine]
    skipped: dict[str, str]
    total_size: int


def disk_page(backend: Backend, sharing: Sharing, who: Principal, prefix: str,
              sort: str) -> DiskPage:
    """The disks ``who`` may read whose keys start with ``prefix``, sorted by ``sort``."""
    listing = scan_refs(backend)
    found = [r for r in listing.refs
             if who.scope.allows(Permission.READ, r.key) and r.key.startswith(prefix)]
    shared = sharing.shared(found)
    lines = [DiskLine(r, shared[r.key]) for r in found]
    lines.sort(key=lambda d: (_first(d, sort), d.ref.key))
    # A skipped ref's name is its key: shown only to a token that may read that key.
    skipped = {name: why for name, why in listing.skipped.items()
               if who.scope.allows(Permission.READ, name.removeprefix("refs/"))}
    return DiskPage(lines, skipped, sum(d.size for d in lines))


# -- caches ------------------------------------------------------------------------------


def may_see(who: Principal, family: str, name: str) -> bool:
    """Whether ``who`` is shown the use of a cache: one its read patterns cover, by name."""
    if sees_everything(who):
        return True
    if family == "gha" or name == OVERFLOW:
        return False
    return who.scope.allows(Permission.READ, name)


@dataclass(frozen=True, slots=True)
class Bar:
    """One bucket of a cache's chart: its hit rate as a bar's height, in a box as wide as
    the bars are many, 20 high."""

    x: int
    lookups: int
    hit_height: float
    title: str


@dataclass(frozen=True, slots=True)
class CacheLine:
    """One cache on the caches page."""

    family: str
    label: str
    name: str
    total: Use
    hit_rate: float | None
    bars: list[Bar]


def _rate(u: Use) -> float | None:
    lookups = u.hits + u.misses
    return None if not lookups else u.hits / lookups


def cache_lines(series: list[Series], who: Principal, bucket_minutes: int,
                start_minute: int) -> list[CacheLine]:
    """The caches ``who`` may see, each with its totals and a bar per bucket."""
    out = []
    for s in series:
        if not may_see(who, s.family, s.name):
            continue
        bars = []
        for i, u in enumerate(s.buckets):
            rate = _rate(u)
            if rate is None and not u.bytes_out:
                continue
            at = time.strftime("%Y-%m-%d %H:%M UTC",
                               time.gmtime((start_minute + i * bucket_minutes) * 60))
            rate_text = "no lookups" if rate is None else f"{100 * rate:.0f}% hits"
            bars.append(Bar(i, u.hits + u.misses, round(20 * (rate or 0), 3),
                            f"{at}: {u.hits + u.misses} lookups, {rate_text}, "
                            f"{format_size(u.bytes_out)} served"))
        out.append(CacheLine(s.family, FAMILY_NAMES.get(s.family, s.family), s.name, s.total,
                             _rate(s.total), bars))
    return out


@dataclass(frozen=True, slots=True)
class CachePage:
    """The caches page: the window, its caches, and the evictions (None: not shown)."""

    window: str
    bars: int
    bar_minutes: int
    lines: list[CacheLine]
    evictions: dict[str, int] | None
    evictions_since_start: dict[str, int] | None


def cache_page(history: History, current: Tally, evicted_now: dict[str, int],
               who: Principal, window: str, now: float) -> CachePage:
    """Every cache ``who`` may see over ``window`` (a key of ``WINDOWS``), with the minute
    under way (``current``) in the last bar."""
    window = window if window in WINDOWS else "1h"
    bars, bucket = WINDOWS[window]
    # Bars on a grid of their length, the last holding the minute under way.
    start = (minute_of(now) // bucket + 1) * bucket - bars * bucket
    lines = cache_lines(history.use(start, bucket, bars, current), who, bucket, start)
    everything = sees_everything(who)
    return CachePage(window, bars, bucket, lines,
                     history.evictions(start) if everything else None,
                     evicted_now if everything else None)


# -- the store ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StorePage:
    """The store page: its size over a window as a line, and the newest gc runs."""

    window: str
    sizes: list[StoreSize]
    points: list[tuple[float, float]]  # each size's place in a 100 by 30 box
    steps: list[tuple[float, float]]  # the line through them: a size holds until the next
    largest: int
    runs: list[GcRun]
    freed_widths: list[float]  # each run's bytes freed, in percent of the most any freed


def store_page(history: History, window: str, now: float) -> StorePage:
    """The store's sizes over ``window`` (a key of ``STORE_WINDOWS``) and the gc runs."""
    window = window if window in STORE_WINDOWS else "7d"
    sizes = history.sizes(now - STORE_WINDOWS[window])
    largest = max([s.bytes for s in sizes] + [1])
    # From the first measurement on: a young server's line fills the chart.
    since = sizes[0].at if sizes else now
    span = max(now - since, 1.0)
    points = [(round(100 * (s.at - since) / span, 3), round(30 - 29 * s.bytes / largest, 3))
              for s in sizes]
    steps = [q for a, b in itertools.pairwise(points) for q in (a, (b[0], a[1]))]
    if points:  # the last size holds until now
        steps += [points[-1], (100.0, points[-1][1])]
    runs = history.gc_runs()
    most = max([r.bytes_freed for r in runs] + [1])
    return StorePage(window, sizes, points, steps, largest, runs,
                     [round(100 * r.bytes_freed / most, 3) for r in runs])
