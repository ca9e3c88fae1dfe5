"""Garbage collection: mark from refs, sweep packs that hold nothing live, repack mostly-dead ones.

Only packs older than the grace period are touched, so the packs of a commit still in flight are
never swept; a commit also checks, before it moves its ref, that every pack it references still
exists (see ``ObjectStore.check_present``), so a sweep racing a commit makes the commit fail
cleanly instead of publishing a broken snapshot.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from .. import codec
from ..digest import Digest
from ..errors import BackendError, NotFound
from ..snapshot import load_manifest
from ..store import Backend, ObjectStore, open_backend
from ..store.objects import decode_index
from . import mounts, refs

DEFAULT_GRACE = 3600.0
REPACK_BELOW = 0.5  # repack a pack when less than this share of its bytes is live


@dataclass(slots=True)
class GcReport:
    """What a gc removed (or would remove, on a dry run)."""

    live_objects: int = 0
    packs_deleted: int = 0
    packs_repacked: int = 0
    orphans_deleted: int = 0
    bytes_freed: int = 0
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)


def mark(backend: Backend, store: ObjectStore) -> set[Digest]:
    """Every object reachable from a ref generation or a mount on this machine."""
    snapshots = {g.snapshot for r in refs.list_refs(backend) for g in r.generations}
    snapshots |= {m.base for m in mounts.all_mounts() if m.base and m.store == backend.url}
    live: set[Digest] = set()
    for hexd in snapshots:
        snap = Digest.parse(hexd)
        try:
            m = load_manifest(store, snap)
        except NotFound as exc:
            raise BackendError(f"gc stopped before deleting anything: snapshot {snap} of a live "
                               f"disk is missing ({exc})") from exc
        live.add(snap)
        live.update(Digest(bytes.fromhex(h)) for h in m.chunk_digests())
    return live


def gc(store_url: str | None = None, *, grace: float = DEFAULT_GRACE,
       dry_run: bool = False) -> GcReport:
    """Collect garbage in the store; ``dry_run`` only reports."""
    backend = open_backend(store_url)
    store = ObjectStore(backend)
    live = mark(backend, store)
    report = GcReport(live_objects=len(live), dry_run=dry_run)
    now = time.time()
    claimed: set[Digest] = set()
    indexed = set()
    packs = []
    for name in backend.list("index"):
        pack = "packs/" + name.split("/", 1)[1]
        indexed.add(pack)
        st = backend.stat(pack)
        packs.append((st.mtime if st else 0.0, st.size if st else 0, name, pack))
    # Oldest first: where two packs hold the same object, the older copy is the one kept.
    for mtime, size, name, pack in sorted(packs):
        entries = decode_index(name, backend.get(name))
        keep = [e for e in entries if e[0] in live and e[0] not in claimed]
        claimed.update(e[0] for e in keep)
        if now - mtime < grace:
            continue
        live_bytes = sum(ln for _, _, ln in keep)
        if not keep:
            report.packs_deleted += 1
            report.bytes_freed += size
            if not dry_run:
                backend.delete(name)
                backend.delete(pack)
        elif live_bytes < REPACK_BELOW * size:
            report.packs_repacked += 1
            report.bytes_freed += size - live_bytes
            if not dry_run:
                # Its replacement is no orphan, however young it looks: S3 mtimes are whole
                # seconds, so with a short grace it would pass for older than this gc.
                indexed |= _repack(backend, pack, name, keep)
    for name in [*backend.list("packs"), *backend.list("tmp")]:
        st = backend.stat(name)
        if name not in indexed and st and now - st.mtime >= grace:
            report.orphans_deleted += 1
            report.bytes_freed += st.size
            if not dry_run:
                backend.delete(name)
    return report


def _repack(backend: Backend, pack: str, index: str,
            keep: list[tuple[Digest, int, int]]) -> set[str]:
    """Copy the live objects of ``pack`` into new packs, then delete it; return the new packs."""
    fresh = ObjectStore(backend, load_index=False)
    for d, off, ln in keep:
        envelope = backend.get(pack, off, ln)
        codec.decode(envelope, d)  # never carry a corrupt object into a new pack
        fresh.put_envelope(d, envelope)
    fresh.flush()
    backend.delete(index)
    backend.delete(pack)
    return {loc.pack for d, _, _ in keep if (loc := fresh.locate(d)) is not None}
