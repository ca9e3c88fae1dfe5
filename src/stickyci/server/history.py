"""The server's history over time, for the dashboard: cache use per minute, evictions, the
store's size, and what each scheduled gc reclaimed.

Kept in ``history.db``, an SQLite file in the server's state directory beside ``runs.db``:
like the runs, it is the server's own record, not the store's. Counters in memory (the per-cache
tally of ``usage.py``, the Prometheus eviction counters) are sampled once a minute by
``sample_loop`` into one row per cache (and per eviction kind) per minute with any use; a
minute without use writes nothing. Rows older than the retention are deleted as new ones come.

The store's size is measured by listing and sizing every blob (one stat each: cheap on a
``file://`` store, one HEAD per object on S3), so only at start-up, every ``SIZE_EVERY`` and
after each scheduled gc.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..disks import GcReport
from ..errors import StickyError
from ..store import Backend
from .database import Database
from .metrics import Metrics
from .usage import Tally, Use

log = logging.getLogger("stickyci.server")

HISTORY_DB = "history.db"
SAMPLE_EVERY = 10.0
"""Seconds between samples of the counters (into one row per cache per minute): how stale the
minute under way may be on the dashboard for the counts of the other workers of a
``serve --workers`` (a worker's page adds its own counts not sampled yet)."""
USE_DAYS = 14
"""Days of per-minute cache use and evictions kept."""
STORE_DAYS = 365
"""Days of store sizes and gc reports kept."""
SIZE_EVERY = 3600.0
"""Seconds between measurements of the store's size (besides one after each gc)."""
NAMESPACES = ("packs", "index", "refs", "roots", "ac", "cas", "nix")
"""What the store holds: disks' and caches' content, their refs and roots, Bazel and Nix."""
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS cache_use (
        minute INTEGER NOT NULL, family TEXT NOT NULL, name TEXT NOT NULL,
        hits INTEGER NOT NULL, misses INTEGER NOT NULL, bytes_out INTEGER NOT NULL,
        PRIMARY KEY (minute, family, name))""",
    # The same by hour, so a week's chart sums hundreds of rows, not a hundred thousand.
    """CREATE TABLE IF NOT EXISTS cache_hours (
        hour INTEGER NOT NULL, family TEXT NOT NULL, name TEXT NOT NULL,
        hits INTEGER NOT NULL, misses INTEGER NOT NULL, bytes_out INTEGER NOT NULL,
        PRIMARY KEY (hour, family, name))""",
    """CREATE TABLE IF NOT EXISTS evictions (
        minute INTEGER NOT NULL, kind TEXT NOT NULL, entries INTEGER NOT NULL,
        PRIMARY KEY (minute, kind))""",
    """CREATE TABLE IF NOT EXISTS store_size (
        at REAL NOT NULL, bytes INTEGER NOT NULL, objects INTEGER NOT NULL,
        detail TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS store_size_at ON store_size (at)",
    """CREATE TABLE IF NOT EXISTS gc_runs (
        at REAL NOT NULL, seconds REAL NOT NULL, bytes_freed INTEGER NOT NULL,
        packs_deleted INTEGER NOT NULL, packs_repacked INTEGER NOT NULL,
        orphans_deleted INTEGER NOT NULL, live_objects INTEGER NOT NULL,
        bad_indexes INTEGER NOT NULL, skipped INTEGER NOT NULL,
        disks_evicted INTEGER NOT NULL, gha_evicted INTEGER NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS gc_runs_at ON gc_runs (at)",
)


@dataclass(frozen=True, slots=True)
class StoreSize:
    """The store's bytes and objects at one time, and its bytes per namespace."""

    at: float
    bytes: int
    objects: int
    detail: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class GcRun:
    """One scheduled eviction and gc pass: when, how long, and what it reclaimed."""

    at: float
    seconds: float
    bytes_freed: int
    packs_deleted: int
    packs_repacked: int
    orphans_deleted: int
    live_objects: int
    bad_indexes: int
    skipped: int
    disks_evicted: int
    gha_evicted: int

    @classmethod
    def of(cls, report: GcReport, at: float, seconds: float, disks_evicted: int,
           gha_evicted: int) -> GcRun:
        """The row of a gc's report."""
        return cls(at, seconds, report.bytes_freed, report.packs_deleted, report.packs_repacked,
                   report.orphans_deleted, report.live_objects, report.bad_indexes,
                   len(report.skipped), disks_evicted, gha_evicted)


@dataclass(frozen=True, slots=True)
class Series:
    """One cache's use over a window, in equal buckets (oldest first), and its totals."""

    family: str
    name: str
    buckets: list[Use]
    total: Use


def minute_of(ts: float) -> int:
    """The minute (since the epoch) a time falls in."""
    return int(ts // 60)


def measure_store(backend: Backend, now: float | None = None) -> StoreSize:
    """The store's size now: every blob of every namespace, listed and sized."""
    detail: dict[str, int] = {}
    objects = 0
    for ns in NAMESPACES:
        size = 0
        for name in backend.list(ns):
            st = backend.stat(name)
            if st is not None:  # deleted since it was listed
                size += st.size
                objects += 1
        detail[ns] = size
    return StoreSize(time.time() if now is None else now, sum(detail.values()), objects, detail)


class History(Database):
    """``history.db``: cache use, evictions, store sizes and gc runs over time."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, _SCHEMA, "history database")

    # -- writing -------------------------------------------------------------------------

    def add_use(self, minute: int, tally: Tally, evictions: dict[str, int]) -> None:
        """Add a minute's cache use and evictions (added to what the minute already has)."""
        with self._db() as db:
            for table, when in (("cache_use", minute), ("cache_hours", minute // 60)):
                db.executemany(
                    f"INSERT INTO {table} VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
                    "hits = hits + excluded.hits, misses = misses + excluded.misses, "
                    "bytes_out = bytes_out + excluded.bytes_out",
                    [(when, family, name, u.hits, u.misses, u.bytes_out)
                     for (family, name), u in tally.items()])
            db.executemany(
                "INSERT INTO evictions VALUES (?, ?, ?) ON CONFLICT DO UPDATE SET "
                "entries = entries + excluded.entries",
                [(minute, kind, n) for kind, n in evictions.items() if n])

    def add_size(self, size: StoreSize) -> None:
        """Record a measurement of the store's size."""
        with self._db() as db:
            db.execute("INSERT INTO store_size VALUES (?, ?, ?, ?)",
                       (size.at, size.bytes, size.objects, json.dumps(size.detail)))

    def add_gc(self, run: GcRun) -> None:
        """Record a scheduled gc's report."""
        row = asdict(run)
        with self._db() as db:
            db.execute(f"INSERT INTO gc_runs ({', '.join(row)}) "
                       f"VALUES ({', '.join('?' * len(row))})", tuple(row.values()))

    def prune(self, now: float) -> None:
        """Forget what is older than the retention."""
        with self._db() as db:
            db.execute("DELETE FROM cache_use WHERE minute < ?",
                       (minute_of(now - USE_DAYS * 86400),))
            db.execute("DELETE FROM cache_hours WHERE hour < ?",
                       (minute_of(now - USE_DAYS * 86400) // 60,))
            db.execute("DELETE FROM evictions WHERE minute < ?",
                       (minute_of(now - USE_DAYS * 86400),))
            db.execute("DELETE FROM store_size WHERE at < ?", (now - STORE_DAYS * 86400,))
            db.execute("DELETE FROM gc_runs WHERE at < ?", (now - STORE_DAYS * 86400,))

    # -- reading -------------------------------------------------------------------------

    def use(self, start: int, bucket: int, count: int,
            current: Tally | None = None) -> list[Series]:
        """Every cache's use from minute ``start`` in ``count`` buckets of ``bucket``
        minutes, with ``current`` (what the minute under way has counted) in the last.
        Buckets of whole hours from a whole hour are summed from the hourly rows."""
        table, column, step = "cache_use", "minute", 1
        if start % 60 == 0 and bucket % 60 == 0:
            table, column, step = "cache_hours", "hour", 60
        first, size = start // step, bucket // step
        with self._db() as db:
            rows = db.execute(
                f"SELECT family, name, ({column} - ?) / ? AS b, SUM(hits), SUM(misses), "
                f"SUM(bytes_out) FROM {table} WHERE {column} >= ? AND {column} < ? "
                "GROUP BY family, name, b", (first, size, first, first + size * count)).fetchall()
        found: dict[tuple[str, str], list[Use]] = {}
        for family, name, b, hits, misses, out in rows:
            found.setdefault((family, name), [Use() for _ in range(count)])[b].add(
                Use(hits, misses, out))
        for where, u in (current or {}).items():
            found.setdefault(where, [Use() for _ in range(count)])[-1].add(u)
        out_series = []
        for (family, name), buckets in sorted(found.items()):
            total = Use()
            for u in buckets:
                total.add(u)
            out_series.append(Series(family, name, buckets, total))
        return out_series

    def evictions(self, start: int) -> dict[str, int]:
        """Entries evicted per kind since minute ``start``."""
        with self._db() as db:
            rows = db.execute("SELECT kind, SUM(entries) FROM evictions WHERE minute >= ? "
                              "GROUP BY kind ORDER BY kind", (start,)).fetchall()
        return {kind: int(n) for kind, n in rows}

    def sizes(self, since: float) -> list[StoreSize]:
        """The store's measured sizes since ``since``, oldest first."""
        with self._db() as db:
            rows = db.execute("SELECT at, bytes, objects, detail FROM store_size WHERE at >= ? "
                              "ORDER BY at", (since,)).fetchall()
        return [StoreSize(at, n, objects, _detail(detail)) for at, n, objects, detail in rows]

    def gc_runs(self, limit: int = 50) -> list[GcRun]:
        """The newest scheduled gc runs first."""
        with self._db() as db:
            rows = db.execute(f"SELECT {', '.join(f.name for f in fields(GcRun))} FROM gc_runs "
                              "ORDER BY at DESC LIMIT ?", (limit,)).fetchall()
        return [GcRun(*row) for row in rows]


def _detail(text: str) -> dict[str, int]:
    # Our own JSON, but a damaged file must not break the page.
    try:
        doc = json.loads(text)
    except ValueError:
        return {}
    return {str(k): v for k, v in doc.items() if type(v) is int} if isinstance(doc, dict) else {}


def evictions_of(metrics: Metrics) -> dict[str, int]:
    """Entries evicted per kind since the server started, from its Prometheus counter."""
    counts: dict[str, int] = {}
    for family in metrics.evictions.collect():
        for s in family.samples:
            if s.name.endswith("_total"):
                counts[s.labels["kind"]] = int(s.value)
    return counts


class Sampler:
    """Moves the counters in memory into the history: the per-cache tally as it is, and the
    eviction counters as the difference since the last sample."""

    def __init__(self, history: History, metrics: Metrics) -> None:
        self.history = history
        self.metrics = metrics
        self._evicted = evictions_of(metrics)

    def sample(self, now: float) -> None:
        """Write what was counted since the last sample under the minute of ``now``."""
        counts = evictions_of(self.metrics)
        delta = {k: n - self._evicted.get(k, 0) for k, n in counts.items()}
        self._evicted = counts
        tally = self.metrics.caches.take()
        if tally or any(delta.values()):  # an idle server writes nothing every few seconds
            self.history.add_use(minute_of(now), tally, delta)
        self.history.prune(now)


def record_store(history: History, backend: Backend) -> None:
    """Measure the store and record its size."""
    history.add_size(measure_store(backend))


def record_gc(history: History, backend: Backend, run: GcRun) -> None:
    """Record a scheduled gc's report, and the store's size after it."""
    history.add_gc(run)
    record_store(history, backend)


async def sample_loop(history: History, metrics: Metrics, backend: Backend | None,
                      every: float = SAMPLE_EVERY) -> None:
    """Sample the counters every ``every`` seconds (just after each interval begins, for the
    interval that ended), and the store's size at start and every ``SIZE_EVERY`` (unless
    ``backend`` is None: one worker of several measures it), until cancelled; what was
    counted when it is cancelled is written too."""
    sampler = Sampler(history, metrics)
    measured = -SIZE_EVERY
    try:
        while True:
            try:
                if backend is not None and time.monotonic() - measured >= SIZE_EVERY:
                    measured = time.monotonic()
                    await asyncio.to_thread(record_store, history, backend)
                # Just after an interval begins, so a sample falls in the minute it counted.
                await asyncio.sleep(every - time.time() % every + 0.5)
                await asyncio.to_thread(sampler.sample, time.time() - 1)
            except StickyError as exc:
                log.warning("sampling the server's history failed: %s", exc)
            except Exception:  # a bug must not end the sampling: log it, go on
                log.exception("sampling the server's history failed unexpectedly")
    finally:
        # On shutdown: what the minute under way counted, so a restart loses nothing.
        with contextlib.suppress(StickyError):
            sampler.sample(time.time())
