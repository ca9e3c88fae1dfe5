"""Garbage collection: mark from refs, sweep packs that hold nothing live, repack mostly-dead ones.

What is live is decided here, from disk refs; moving live objects out of a pack is the pack
layer's (:func:`stickyci.store.repack`).

Only packs older than the grace period are touched, so the packs of a commit still in flight are
never swept; a commit also checks, before it moves its ref, that every pack it references still
exists (see ``ObjectStore.check_present``), so a sweep racing a commit makes the commit fail
cleanly instead of publishing a broken snapshot.

Refs and indexes are written by scoped writers, so neither is trusted: a ref that does not
parse protects nothing (its data is collected like any unreferenced data, and the ref is listed
in the report's ``skipped``); an index that has no pack or points outside its pack claims
nothing, and goes as garbage after the grace period (a damaged index claims nothing either, but
it and its pack are kept for an admin to restore); and a pack's live object is dropped in favour
of another pack's copy only once that copy has been read back and verified.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..digest import Digest
from ..errors import BackendError, IntegrityError, NotFound
from ..snapshot import Manifest
from ..store import (
    Backend,
    IndexEntry,
    Location,
    Stat,
    as_backend,
    decode_index,
    read_at,
    repack,
)
from . import mounts, refs
from .refs import each

log = logging.getLogger("stickyci")
DEFAULT_GRACE = 3600.0
REPACK_BELOW = 0.5  # repack a pack when less than this share of its bytes is live


@dataclass(slots=True)
class GcReport:
    """What a gc removed (or would remove, on a dry run), and the refs it could not read."""

    live_objects: int = 0
    packs_deleted: int = 0
    packs_repacked: int = 0
    orphans_deleted: int = 0
    bad_indexes: int = 0
    bytes_freed: int = 0
    refs_rehinted: int = 0
    dry_run: bool = False
    skipped: dict[str, str] = field(default_factory=dict)  # ref name → why it was ignored

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)


Where = dict[bytes, list[Location]]  # raw digest → where the indexes claim it lies


def mark(backend: Backend, found: list[refs.DiskRef], where: Where,
         roots: set[Digest] | None = None) -> set[Digest]:
    """Every object reachable from a generation of ``found``, a snapshot in ``roots`` or a
    mount on this machine.

    Manifests are read through the claims in ``where``; a claim that does not verify is passed
    over for the next, so an index that lies about an object cannot hide a live snapshot.
    """
    snapshots = {g.snapshot for r in found for g in r.generations} | (roots or set())
    snapshots |= {m.base for m in mounts.all_mounts() if m.base and m.store == backend.url}
    live: set[Digest] = set(snapshots)
    for m in each(lambda snap: _manifest(backend, where, snap), sorted(snapshots)):
        live.update(Digest(bytes.fromhex(h)) for h in m.chunk_digests())
    return live


def scan_roots(backend: Backend, skipped: dict[str, str]) -> set[Digest]:
    """The snapshots the server's caches keep live: ``roots/<name>`` blobs, JSON objects whose
    ``snapshot`` is a snapshot id (hex). Only the server writes them (the blob API lets no
    client write ``roots/``); one that does not parse keeps nothing and is listed in ``skipped``."""
    found = set()
    for name in backend.list("roots"):
        try:
            found.add(root_snapshot(backend.get(name), name))
        except NotFound:
            continue  # removed since the listing
        except IntegrityError as exc:
            skipped[name] = str(exc)
            log.warning("gc: skipping %s", skipped[name])
    return found


def root_snapshot(data: bytes, name: str) -> Digest:
    """The snapshot a root record (``roots/<name>``: JSON with a ``snapshot`` id) keeps live;
    ``IntegrityError`` naming it if it is not one."""
    try:
        return Digest.parse(json.loads(data)["snapshot"])
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"{name} is not a root record ({exc})") from exc


def _manifest(backend: Backend, where: Where, snap: Digest) -> Manifest:
    problem = "no index lists it"
    for loc in where.get(snap.raw, []):
        try:
            plain = read_at(backend, loc, snap)
        except (IntegrityError, NotFound) as exc:
            problem = str(exc)
            continue
        return Manifest.decode(plain, f"snapshot {snap}")
    raise BackendError(f"gc stopped before deleting anything: snapshot {snap} of a live disk "
                       f"is missing or unreadable ({problem})")


@dataclass(frozen=True, slots=True)
class _Pack:
    mtime: float
    size: int
    index: str
    pack: str
    entries: list[IndexEntry] | None  # None: an index that claims nothing
    damaged: bool = False  # unreadable, with its pack present: both are left for an admin


def _read_index(backend: Backend, name: str, stats: dict[str, Stat] | None) -> _Pack | None:
    """An index and its pack (its size and age from ``stats``, the listing of packs, when
    the backend gives one); ``entries`` is None unless the index fits the pack it names.

    Every index is read from the store, never from a runner's local index: gc is also
    where a damaged index comes to light."""
    pack = "packs/" + name.split("/", 1)[1]
    try:
        data = backend.get(name)
    except NotFound:
        return None  # deleted since the listing
    st = backend.stat(pack) if stats is None else stats.get(pack)
    entries: list[IndexEntry] | None
    try:
        entries = decode_index(name, data)
    except IntegrityError as exc:
        if st is not None:
            # Damage rather than a lie (the server checks an index before storing it): its
            # pack may hold live objects, so neither is deleted.
            log.warning("gc: %s; its pack is kept", exc)
            return _Pack(st.mtime, st.size, name, pack, None, damaged=True)
        entries = None
    if st is None:
        ist = backend.stat(name)  # its own age decides when it goes
        if ist is None:
            return None
        if entries is not None:
            log.warning("gc: %s claims nothing: its pack is missing", name)
        return _Pack(ist.mtime, 0, name, pack, None)
    if entries is not None and any(e.length <= 0 or e.offset + e.length > st.size
                                   for e in entries):
        log.warning("gc: %s claims nothing: entries lie outside its pack's %d bytes",
                    name, st.size)
        entries = None
    return _Pack(st.mtime, st.size, name, pack, entries)


def listed_stats(backend: Backend, namespace: str) -> dict[str, Stat] | None:
    """Size and age of every blob under ``namespace`` from the listing itself, where the
    backend gives them there (``list_stats``: ``file://`` and S3 do), else None."""
    lister = getattr(backend, "list_stats", None)
    return lister(namespace) if lister is not None else None


def _holds(backend: Backend, where: Location, digest: Digest) -> bool:
    """Whether the pack claiming ``digest`` really holds it at the place its index says."""
    try:
        read_at(backend, where, digest)
    except (IntegrityError, NotFound):
        return False
    return True


def gc(store: str | Backend | None = None, *, grace: float = DEFAULT_GRACE,
       dry_run: bool = False) -> GcReport:
    """Collect garbage in the store (a URL, an open backend, or the default); ``dry_run`` only
    reports."""
    backend = as_backend(store)
    report = GcReport(dry_run=dry_run)
    # Refs before indexes: a commit publishes its index before it moves its ref.
    listing = refs.scan_refs(backend)
    report.skipped = listing.skipped
    roots = scan_roots(backend, report.skipped)
    indexed = set()
    packs = []
    names = backend.list("index")
    # Packs listed after indexes: a pack is written before its index, so every index listed
    # has its pack in this listing unless it was deleted since.
    stats = listed_stats(backend, "packs")
    for found in each(lambda name: _read_index(backend, name, stats), names):
        if found is not None:
            packs.append(found)
            if found.entries is not None or found.damaged:
                indexed.add(found.pack)
    # Oldest first: where two packs hold the same object, the older copy is the one kept.
    packs.sort(key=lambda p: (p.mtime, p.index))
    where: Where = {}
    for p in packs:
        for e in p.entries or []:
            where.setdefault(e.digest.raw, []).append(Location(p.pack, e.offset, e.length))
    live = mark(backend, listing.refs, where, roots)
    report.live_objects = len(live)
    now = time.time()
    claimed: dict[Digest, Location] = {}
    moved: dict[str, set[str]] = {}  # a pack removed here → the packs holding its live objects
    for p in packs:
        old = now - p.mtime >= grace
        if p.entries is None:
            if old and not p.damaged:
                report.bad_indexes += 1
                if not dry_run:
                    backend.delete(p.index)  # its pack, if any, is now an orphan
            continue
        keep, elsewhere = [], []
        for e in p.entries:
            if e.digest not in live:
                continue
            if e.digest in claimed:
                elsewhere.append(e)
            else:
                claimed[e.digest] = Location(p.pack, e.offset, e.length)
                keep.append(e)
        if not old:
            continue
        live_bytes = sum(e.length for e in keep)
        if elsewhere and (not keep or live_bytes < REPACK_BELOW * p.size):
            # About to drop this pack's copies in favour of another pack's: only if those are
            # real. A claim that does not verify is replaced by this pack's copy.
            for e in elsewhere:
                if not _holds(backend, claimed[e.digest], e.digest):
                    claimed[e.digest] = Location(p.pack, e.offset, e.length)
                    keep.append(e)
            live_bytes = sum(e.length for e in keep)
        if not keep:
            report.packs_deleted += 1
            report.bytes_freed += p.size
            if not dry_run:
                backend.delete(p.index)
                backend.delete(p.pack)
            moved[p.pack] = {claimed[e.digest].pack for e in elsewhere}
        elif live_bytes < REPACK_BELOW * p.size:
            report.packs_repacked += 1
            report.bytes_freed += p.size - live_bytes
            if not dry_run:
                # Its replacement is no orphan, however young it looks: S3 mtimes are whole
                # seconds, so with a short grace it would pass for older than this gc.
                moved[p.pack] = repack(backend, p.pack, p.index, keep)
                indexed |= moved[p.pack]
    tmp = listed_stats(backend, "tmp")
    found_stats: Iterable[tuple[str, Stat | None]]
    if stats is None or tmp is None:
        unindexed = [n for n in [*backend.list("packs"), *backend.list("tmp")]
                     if n not in indexed]
        found_stats = zip(unindexed, each(backend.stat, unindexed), strict=True)
    else:
        found_stats = ((n, st) for n, st in [*stats.items(), *tmp.items()] if n not in indexed)
    for name, st in found_stats:
        if st and now - st.mtime >= grace:
            report.orphans_deleted += 1
            report.bytes_freed += st.size
            if not dry_run:
                backend.delete(name)
    if not dry_run:
        report.refs_rehinted = _rehint(backend, listing.refs, moved)
    return report


def _rehint(backend: Backend, found: list[refs.DiskRef], moved: dict[str, set[str]]) -> int:
    """Point the generations' pack hints (:attr:`refs.Generation.packs`) that name a pack
    this gc removed at the packs now holding its live objects; return how many refs changed.

    A stale hint is never wrong, only slow: a runner new to the store finds the pack gone
    and lists and reads every index instead (at 1,000 disks on S3, seconds per mount).
    A ref that a commit moves meanwhile is rewritten as it is then (``update_ref``).
    """
    def now_in(pack: str) -> set[str]:
        # A claim may lie in a pack this gc repacked too: follow it (new packs are final).
        return set().union(*map(now_in, moved[pack])) if pack in moved else {pack}

    def rewrite(ref: refs.DiskRef | None) -> refs.DiskRef | None:
        if ref is None:
            return None  # removed meanwhile
        changed = False
        for i, g in enumerate(ref.generations):
            if g.pack_names & moved.keys():
                packs = set().union(*map(now_in, g.pack_names))
                ref.generations[i] = replace(g, packs=refs.as_hint(packs))
                changed = True
        return ref if changed else None

    stale = [r.key for r in found if any(g.pack_names & moved.keys() for g in r.generations)]
    for key in stale:
        refs.update_ref(backend, key, rewrite)
    return len(stale)
