"""What a token may read of the content-addressed store: the objects of the disks it may read.

visible(T) is the manifest and the chunks of every kept generation of every disk whose key a
read pattern of T matches. Packs and indexes carry no key, so the server serves a filtered
token a *view* of them: an index lists only the entries in visible(T) (a partial index), and a
pack has every byte outside them zeroed. Tokens that may read every disk (admin, or a read
pattern ``*``) see the stored blobs, unfiltered, which keeps the common path fast.

Everything here is derived from immutable objects (snapshots, indexes), except the map of refs,
which the server updates on every ref it writes and re-reads when older than ``REFS_MAX_AGE``
(an admin may change the store directly).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from ..digest import Digest
from ..disks import DiskRef, scan_refs
from ..errors import IntegrityError, NotFound, UnsafePath
from ..snapshot import load_manifest, validate
from ..store import Backend, IndexEntry, ObjectStore, decode_index, encode_index
from .auth import Permission, Principal

log = logging.getLogger("stickyci.server")

REFS_MAX_AGE = 5.0
"""Seconds a map of refs is trusted before it is re-read from the store."""
MAX_SET_DIGESTS = 4_000_000
"""Most digests the per-snapshot sets hold together (about 400 MB at the limit)."""
MAX_INDEXES = 4096
MAX_VIEWS = 8
MAX_MEMO = 16_384
"""Most partial indexes (or pack spans) memoised per view."""
EVERYTHING = "*"


def sees_everything(who: Principal) -> bool:
    """Whether ``who`` may read every disk, so needs no filtering."""
    s = who.scope
    return s.admin or EVERYTHING in (*s.read, *s.write, *s.delete)


class RefMap:
    """Disk key → the snapshots of its kept generations, with a version that changes with it."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._lock = threading.Lock()
        self._reload = threading.Lock()
        self._snapshots: dict[str, tuple[str, ...]] = {}
        self._loaded_at = -REFS_MAX_AGE
        self.version = 0

    def current(self) -> tuple[int, dict[str, tuple[str, ...]]]:
        """The version and the map, re-read from the store when it is older than allowed."""
        if time.monotonic() - self._loaded_at > REFS_MAX_AGE:
            with self._reload:  # one reader re-reads the refs; the others wait for it
                if time.monotonic() - self._loaded_at > REFS_MAX_AGE:
                    started, before = time.monotonic(), self.version
                    fresh = self._read_all()
                    with self._lock:
                        # A ref written meanwhile may be missing from what was read: keep
                        # the map, and read again next time.
                        if self.version == before:
                            if fresh != self._snapshots:
                                self._snapshots = fresh
                                self.version += 1
                            self._loaded_at = started
        with self._lock:
            return self.version, self._snapshots

    def _read_all(self) -> dict[str, tuple[str, ...]]:
        # A ref that does not parse (an admin's own blob, a damaged ref) grants nothing.
        return {r.key: snapshots_of(r) for r in scan_refs(self.backend).refs}

    def fresh_version(self) -> int | None:
        """The version, if the map needs no re-read now (so using it does no I/O)."""
        return self.version if time.monotonic() - self._loaded_at <= REFS_MAX_AGE else None

    def put(self, key: str, ref: DiskRef) -> None:
        """Record a ref the server just wrote."""
        with self._lock:
            self._snapshots = {**self._snapshots, key: snapshots_of(ref)}
            self.version += 1

    def drop(self, key: str) -> None:
        """Forget a disk the server just removed."""
        with self._lock:
            self._snapshots = {k: v for k, v in self._snapshots.items() if k != key}
            self.version += 1

    def invalidate(self) -> None:
        """Re-read the refs on the next use (the server changed them behind this map)."""
        self._loaded_at = -REFS_MAX_AGE


def snapshots_of(ref: DiskRef) -> tuple[str, ...]:
    """The snapshot ids (hex) of a ref's kept generations."""
    return tuple(g.snapshot.hex for g in ref.generations)


class Visibility:
    """visible(T) and the views of packs and indexes a filtered token gets."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.refs = RefMap(backend)
        self._store = ObjectStore(backend, load_index=False)
        self._lock = threading.Lock()
        self._sets: OrderedDict[str, frozenset[bytes]] = OrderedDict()
        self._set_digests = 0
        self._readable: dict[str, tuple[int, frozenset[str]]] = {}
        self._views: OrderedDict[frozenset[str], View] = OrderedDict()
        self._indexes: OrderedDict[str, list[IndexEntry] | None] = OrderedDict()

    # -- objects of snapshots ------------------------------------------------------------

    def objects(self, snapshot: str) -> frozenset[bytes]:
        """The raw digests a snapshot names (its manifest and its chunks); ``NotFound`` if
        it is not in the store, ``IntegrityError`` if it is not a valid manifest."""
        with self._lock:
            got = self._sets.get(snapshot)
            if got is not None:
                self._sets.move_to_end(snapshot)
                return got
        try:
            digest = Digest.parse(snapshot)
        except ValueError as exc:
            raise IntegrityError(f"snapshot {snapshot!r} is not a BLAKE3 digest") from exc
        try:
            manifest = load_manifest(self._store, digest)
        except NotFound:
            # gc may have repacked it since this store indexed it: look again, once.
            self._store = ObjectStore(self.backend, load_index=False)
            manifest = load_manifest(self._store, digest)
        try:
            validate(manifest, f"snapshot {digest}")
        except UnsafePath as exc:
            raise IntegrityError(f"snapshot {digest} is not a safe tree: {exc}") from exc
        # validate() checked every chunk reference is 64 hex digits.
        found = frozenset({digest.raw, *map(bytes.fromhex, manifest.chunk_digests())})
        with self._lock:
            if snapshot not in self._sets:
                self._sets[snapshot] = found
                self._set_digests += len(found)
                while self._set_digests > MAX_SET_DIGESTS and len(self._sets) > 1:
                    self._set_digests -= len(self._sets.popitem(last=False)[1])
        return found

    def _objects_or_nothing(self, snapshot: str) -> frozenset[bytes]:
        # A kept generation whose snapshot is gone or damaged shows nothing, not an error:
        # one broken disk must not stop a token reading the others.
        try:
            return self.objects(snapshot)
        except (NotFound, IntegrityError) as exc:
            log.warning("snapshot %s of a disk is unreadable, so it shows nothing: %s",
                        snapshot, exc)
            return frozenset()

    # -- visible(T) ----------------------------------------------------------------------

    def readable(self, who: Principal) -> frozenset[str]:
        """The snapshots of every disk ``who`` may read (cached per token and refs version)."""
        version, snapshots = self.refs.current()
        cached = self._readable.get(who.id)
        if cached is not None and cached[0] == version:
            return cached[1]
        found = frozenset(s for key, snaps in snapshots.items()
                          if who.scope.allows(Permission.READ, key) for s in snaps)
        self._readable[who.id] = (version, found)
        return found

    def view(self, who: Principal) -> View | None:
        """visible(T) with its memos, or None when ``who`` sees everything."""
        if sees_everything(who):
            return None
        snaps = self.readable(who)
        with self._lock:
            got = self._views.get(snaps)
            if got is not None:
                self._views.move_to_end(snaps)
                return got
        union: set[bytes] = set()
        for s in snaps:
            union |= self._objects_or_nothing(s)
        made = View(frozenset(union))
        with self._lock:
            self._views[snaps] = made
            while len(self._views) > MAX_VIEWS:
                self._views.popitem(last=False)
        return made

    def memo(self, who: Principal) -> View | None:
        """The view of a filtered token if it is at hand without I/O, else None (then
        ``view`` in a worker thread gets it)."""
        version = self.refs.fresh_version()
        cached = self._readable.get(who.id)
        if version is None or cached is None or cached[0] != version:
            return None
        return self._views.get(cached[1])

    def visible(self, who: Principal) -> frozenset[bytes] | None:
        """visible(T) as raw digests, or None when ``who`` sees everything."""
        v = self.view(who)
        return None if v is None else v.objects

    def not_visible(self, who: Principal, digests: Iterable[bytes]) -> set[bytes]:
        """Those of ``digests`` that ``who`` may not read."""
        rest = set(digests)
        if not rest or sees_everything(who):
            return set()
        snaps = self.readable(who)
        with self._lock:
            made = self._views.get(snaps)
        if made is not None:
            return rest - made.objects
        # Without a cached union, walking the sets is cheaper than building one for a
        # commit's few new objects.
        for s in snaps:
            rest -= self._objects_or_nothing(s)
            if not rest:
                break
        return rest

    # -- views of packs and indexes ------------------------------------------------------

    def index_entries(self, pack_id: str) -> list[IndexEntry] | None:
        """The stored index of a pack, or None when it has none (yet)."""
        with self._lock:
            if pack_id in self._indexes:
                self._indexes.move_to_end(pack_id)
                return self._indexes[pack_id]
        name = f"index/{pack_id}"
        try:
            entries: list[IndexEntry] | None = decode_index(name, self.backend.get(name))
        except NotFound:
            return None  # not cached: the index may arrive any moment
        with self._lock:
            self._indexes[pack_id] = entries
            while len(self._indexes) > MAX_INDEXES:
                self._indexes.popitem(last=False)
        return entries

    def remember_index(self, pack_id: str, entries: list[IndexEntry]) -> None:
        """Cache the entries of an index the server just verified and stored."""
        with self._lock:
            self._indexes[pack_id] = entries
            while len(self._indexes) > MAX_INDEXES:
                self._indexes.popitem(last=False)

    def index_view(self, who: Principal, pack_id: str) -> bytes | None:
        """The partial index ``who`` gets for pack ``pack_id``; None: the stored one."""
        v = self.view(who)
        if v is None:
            return None
        if pack_id in v.indexes:
            return v.indexes[pack_id]
        entries = self.index_entries(pack_id)
        if entries is None:
            raise NotFound(f"store object index/{pack_id} is missing")
        shown = [e for e in entries if e.digest.raw in v.objects]
        got = None if len(shown) == len(entries) else encode_index(shown, partial=True)
        v.remember(v.indexes, pack_id, got)
        return got

    def pack_spans(self, who: Principal, pack_id: str) -> list[tuple[int, int]] | None:
        """The byte spans (start, end) of a pack ``who`` may read, in order; None: all."""
        v = self.view(who)
        if v is None:
            return None
        if pack_id in v.spans:
            return v.spans[pack_id]
        entries = self.index_entries(pack_id)
        spans = sorted((e.offset, e.offset + e.length) for e in entries or ()
                       if e.digest.raw in v.objects)
        if entries is not None:  # a pack without an index yet may get one any moment
            v.remember(v.spans, pack_id, spans)
        return spans


class View:
    """visible(T) of one set of readable snapshots, with what was derived from it: it never
    changes, so neither do the partial indexes and pack spans computed from it."""

    def __init__(self, objects: frozenset[bytes]) -> None:
        self.objects = objects
        self.indexes: dict[str, bytes | None] = {}
        self.spans: dict[str, list[tuple[int, int]]] = {}

    def remember(self, memo: dict[str, Any], pack_id: str, value: Any) -> None:
        """Memoise a derived value, within a bound (dropping all is as correct as keeping)."""
        if len(memo) >= MAX_MEMO:
            memo.clear()
        memo[pack_id] = value


def covered(spans: list[tuple[int, int]], start: int, end: int) -> bool:
    """Whether spans (sorted, disjoint) cover every byte of [start, end)."""
    pos = start
    for a, b in spans:
        if b <= pos:
            continue
        if a > pos:
            return False
        pos = b
        if pos >= end:
            return True
    return pos >= end


def redact(data: bytes, start: int, spans: list[tuple[int, int]]) -> bytes:
    """``data`` (the bytes of a blob from ``start``) with every byte outside ``spans`` zeroed."""
    out = bytearray(len(data))
    end = start + len(data)
    for a, b in spans:
        lo, hi = max(a, start), min(b, end)
        if lo < hi:
            out[lo - start : hi - start] = data[lo - start : hi - start]
    return bytes(out)
