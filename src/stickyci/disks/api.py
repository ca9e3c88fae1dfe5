"""Sticky disks: mount a clone of a disk's latest snapshot, commit what changed, unmount.

Commit order is what makes it safe: new objects are written (packs, then indexes), then the
manifest, then the ref moves by compare-and-swap. A commit that dies at any point leaves the
ref as it was; what it wrote is unreferenced and ``gc`` removes it later.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..digest import Digest
from ..errors import ConflictError, NotFound, UsageError
from ..snapshot import Manifest, diff, fill_content, load_manifest, save_manifest
from ..store import Backend, ObjectStore, open_backend
from . import basecache, holders, mounts, policy, refs, strategies
from .refs import KEEP_GENERATIONS, DiskRef, Generation

log = logging.getLogger("stickyci")
COMMIT_MODES = ("on-change", "always", "if-missing")
CONFLICT_MODES = ("lww", "fail")


@dataclass(slots=True)
class MountResult:
    """What a mount did."""

    key: str
    path: str
    strategy: str
    generation: int
    snapshot: str
    fresh: bool
    base_cached: bool
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)


@dataclass(slots=True)
class CommitResult:
    """What a commit did; ``raced_with`` lists generations committed since this mount."""

    key: str
    path: str
    committed: bool
    reason: str
    generation: int = 0
    snapshot: str = ""
    files: int = 0
    size: int = 0
    added: int = 0
    removed: int = 0
    modified: int = 0
    stored_bytes: int = 0
    stored_objects: int = 0
    raced_with: list[dict[str, Any]] = field(default_factory=list)
    killed: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)


def _prepare_mount_path(path: Path) -> Path:
    if path.exists() and not path.is_dir():
        raise UsageError(f"mount path {path} is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    path = path.resolve()
    if (mounts.state_dir(path) / "state.json").exists():
        raise UsageError(f"{path} is already a stickyci mount; commit or unmount it first")
    if any(path.iterdir()):
        raise UsageError(f"mount path {path} is not empty; mount onto an empty directory")
    return path


def _existing_dir(path: Path) -> Path:
    if not path.exists():
        raise UsageError(f"path {path} does not exist")
    if not path.is_dir():
        raise UsageError(f"path {path} is not a directory")
    return path.resolve()


def mount(key: str, path: Path, *, strategy: str = "auto",
          store_url: str | None = None) -> MountResult:
    """Mount a clone of the latest snapshot of ``key`` at ``path`` (empty if the key is new)."""
    start = time.perf_counter()
    refs.check_key(key)
    if strategy != "auto":
        strategies.get(strategy)
    backend = open_backend(store_url)
    path = _prepare_mount_path(path)
    ref = refs.read_ref(backend, key)
    latest = ref.latest if ref else None
    snapshot = latest.snapshot if latest else ""
    store = ObjectStore(backend, load_index=False)

    def manifest() -> Manifest:
        return load_manifest(store, Digest.parse(snapshot)) if snapshot else Manifest()

    state = mounts.MountState(key, str(path), backend.url, "", snapshot,
                              latest.gen if latest else 0, time.time())
    with basecache.pinned(store, snapshot) as (base, cached):
        state.strategy = strategies.mount(strategy, base, path, state.dir, manifest)
        state.save()
    if ref:
        refs.touch(backend, key)
    if not cached:
        basecache.evict()
    return MountResult(key, str(path), state.strategy, state.base_gen, snapshot, ref is None,
                       cached, time.perf_counter() - start)


def _discard(state: mounts.MountState, path: Path) -> None:
    strategies.get(state.strategy).unmount(path, state.dir)
    state.forget()


def commit(path: Path, *, mode: str = "on-change", on_conflict: str = "lww",
           kill_holders: bool = False) -> CommitResult:
    """Store what changed at the mount ``path`` as a new generation, then unmount it.

    On any failure before the ref moves, the mount stays in place and the ref is unchanged.
    """
    start = time.perf_counter()
    if mode not in COMMIT_MODES:
        raise UsageError(f"unknown commit mode {mode!r}: use one of {', '.join(COMMIT_MODES)}")
    if on_conflict not in CONFLICT_MODES:
        raise UsageError(f"unknown conflict mode {on_conflict!r}: use lww or fail")
    path = _existing_dir(path)
    state = mounts.load(path)
    strategy = strategies.get(state.strategy)
    if not strategy.is_mounted(path):
        raise UsageError(f"{path} was unmounted outside stickyci; run "
                         f"`stickyci disk unmount {path}` to clear its record")
    killed = [str(h) for h in holders.release(path, kill=kill_holders)]
    result = CommitResult(state.key, str(path), False, "", killed=killed)
    backend = open_backend(state.store)
    current = refs.read_ref(backend, state.key)
    if mode == "if-missing" and current and current.latest:
        _discard(state, path)
        result.reason = "the disk already has a snapshot (if-missing)"
        result.seconds = time.perf_counter() - start
        return result

    store = ObjectStore(backend)
    base = load_manifest(store, Digest.parse(state.base)) if state.base else Manifest()
    scan, content_root = strategy.changes(path, state.dir, base)
    fill_content(store, content_root, scan.todo)
    changes = diff(base, scan.manifest, scan.touched)
    result.added, result.removed = len(changes.added), len(changes.removed)
    result.modified = len(changes.modified) + len(changes.metadata)
    if mode == "on-change" and changes.empty:
        _discard(state, path)
        result.reason = "nothing changed (on-change)"
        result.seconds = time.perf_counter() - start
        return result

    snapshot = save_manifest(store, scan.manifest)
    # Objects the base generation references stay live while its ref keeps it, so only new
    # content can have been deduplicated against garbage a concurrent gc is sweeping.
    base_kept = not state.base or any(g.snapshot == state.base
                                      for g in (current.generations if current else []))
    fresh = scan.todo if base_kept else scan.manifest.entries.values()
    store.check_present([snapshot.raw, *(bytes.fromhex(h) for e in fresh for h, _ in e.chunks)])
    files = sum(1 for e in scan.manifest.entries.values() if e.kind == "file")
    size = scan.manifest.size
    raced: list[Generation] = []

    def change(ref: DiskRef | None) -> DiskRef:
        nonlocal raced
        raced = [g for g in ref.generations if g.gen > state.base_gen] if ref else []
        if raced and on_conflict == "fail":
            gens = ", ".join(f"{g.gen} by {g.committer}" for g in raced)
            raise ConflictError(f"disk {state.key} was committed since this mount (generation "
                                f"{gens}); nothing was changed. Use --on-conflict lww to win")
        now = time.time()
        new = ref or DiskRef(state.key, now, now)
        gen = Generation((new.latest.gen if new.latest else 0) + 1, snapshot.hex, now, size,
                         files, store.bytes_written, f"{socket.gethostname()}:{os.getpid()}")
        new.generations = [*new.generations, gen][-KEEP_GENERATIONS:]
        new.last_used = now
        return new

    ref = refs.update_ref(backend, state.key, change)
    assert ref is not None and ref.latest is not None
    result.committed, result.reason = True, "committed"
    result.generation, result.snapshot = ref.latest.gen, snapshot.hex
    result.files, result.size = files, size
    result.stored_bytes, result.stored_objects = store.bytes_written, store.objects_written
    result.raced_with = [asdict(g) for g in raced]
    if raced:
        log.warning("disk %s: this commit raced with generation(s) %s; last write wins, so "
                    "theirs are now history. Give each committing chain its own disk.",
                    state.key, ", ".join(str(g.gen) for g in raced))
    _finish(state, path, snapshot.hex, size, adoptable=scan.skipped == 0)
    result.seconds = time.perf_counter() - start
    return result


def _finish(state: mounts.MountState, path: Path, snapshot: str, size: int,
            *, adoptable: bool) -> None:
    """Unmount after a commit; a clone is kept as the new snapshot's base when it can be."""
    if state.strategy != "overlay" and adoptable:
        mode = path.stat().st_mode & 0o7777
        if basecache.adopt(path, snapshot, size):
            path.mkdir(mode=mode)
            os.chmod(path, mode)
            state.forget()
            return
    _discard(state, path)


def unmount(path: Path, *, kill_holders: bool = False) -> dict[str, Any]:
    """Discard the mount at ``path`` without committing."""
    path = _existing_dir(path)
    state = mounts.load(path)
    killed = [str(h) for h in holders.release(path, kill=kill_holders)]
    _discard(state, path)
    return {"key": state.key, "path": str(path), "discarded": True, "killed": killed}


def _require(backend: Backend, key: str) -> DiskRef:
    ref = refs.read_ref(backend, key)
    if ref is None:
        raise NotFound(f"disk {key} does not exist; `stickyci disk ls` lists the disks")
    return ref


def _open(store: str | Backend | None) -> Backend:
    return store if store is not None and not isinstance(store, str) else open_backend(store)


def list_disks(store: str | Backend | None = None) -> list[dict[str, Any]]:
    """One summary row per disk, from a store URL or an open backend."""
    rows = []
    for ref in refs.list_refs(_open(store)):
        latest = ref.latest
        rows.append({"key": ref.key, "generation": latest.gen if latest else 0,
                     "generations": len(ref.generations), "size": latest.size if latest else 0,
                     "files": latest.files if latest else 0, "last_used": ref.last_used,
                     "last_committed": latest.committed_at if latest else None})
    return rows


def show(key: str, store: str | Backend | None = None) -> dict[str, Any]:
    """A disk's generations, sizes and last use."""
    return asdict(_require(_open(store), refs.check_key(key)))


def diff_disk(key: str, gen_a: int | None = None, gen_b: int | None = None,
              store_url: str | None = None) -> dict[str, Any]:
    """What changed between two generations (default: the previous and the latest)."""
    backend = open_backend(store_url)
    ref = _require(backend, refs.check_key(key))
    assert ref.latest is not None
    b = gen_b if gen_b is not None else ref.latest.gen
    a = gen_a if gen_a is not None else b - 1
    store = ObjectStore(backend)

    def tree(gen: int) -> Manifest:
        if gen == 0:
            return Manifest()
        g = ref.generation(gen)
        if g is None:
            kept = ", ".join(str(x.gen) for x in ref.generations)
            raise NotFound(f"disk {key} has no generation {gen}; kept generations: {kept}")
        return load_manifest(store, Digest.parse(g.snapshot))

    return {"key": key, "from": a, "to": b, **diff(tree(a), tree(b)).as_dict()}


def remove(key: str, store_url: str | None = None) -> dict[str, Any]:
    """Forget a disk; its objects are reclaimed by the next gc."""
    backend = open_backend(store_url)
    _require(backend, refs.check_key(key))
    refs.delete_ref(backend, key)
    return {"key": key, "removed": True}


def evict(ttl: float, *, dry_run: bool = False,
          store: str | Backend | None = None) -> dict[str, Any]:
    """Remove disks not used for ``ttl`` seconds."""
    backend = _open(store)
    found = refs.list_refs(backend)
    stale = policy.unused_for(
        (policy.Used(r.key, r.latest.size if r.latest else 0, r.last_used) for r in found),
        time.time(), ttl)
    if not dry_run:
        for key in stale:
            refs.delete_ref(backend, key)
    return {"evicted": stale, "dry_run": dry_run, "kept": len(found) - len(stale)}
