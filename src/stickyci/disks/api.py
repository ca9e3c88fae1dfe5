"""Sticky disks: mount a clone of a disk's latest snapshot, commit what changed, unmount.

Commit order is what makes it safe: new objects are written (packs, then indexes), then the
manifest, then the ref moves by compare-and-swap. A commit that dies at any point leaves the
ref as it was; what it wrote is unreferenced and ``gc`` removes it later. Once the ref has
moved the commit has happened, and is reported as done even if the unmount after it fails.
A commit reads the tree once it is out of every process's reach (``_seal``), so that what it
read can become this machine's base of the new snapshot as it is; a commit that fails or is
killed before the ref moves leaves the mount to be put back as the job left it.

A mount is all or nothing: a failure after anything was set up undoes it (the overlay or
clone, the record, the directories it created at the path), so a retry starts clean.

One calling convention: a function that reads the store takes it as ``store``, a store URL,
an open :class:`~stickyci.store.Backend` (the server passes its own), or ``None`` for the
default store; a function that works on a mount finds its store in the mount's record. Every
function returns a dataclass whose ``as_dict()`` is its JSON form (what ``--json`` prints).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..digest import Digest
from ..errors import ConflictError, NotFound, StickyError, UsageError
from ..fsutil import Tree, empty_dir
from ..snapshot import (
    Content,
    ContentFill,
    Diff,
    Entry,
    Manifest,
    Scan,
    diff,
    fill_content,
    load_manifest,
    save_manifest,
)
from ..store import Backend, ObjectStore, as_backend, decode_index, open_backend
from . import basecache, holders, mounts, policy, refs, strategies
from .refs import DiskRef, Generation
from .strategies.overlay import Overlay, Teardown, apply_upper, detach

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
    stored_bytes: int = 0  # objects written to the store: new content and the manifest
    stored_objects: int = 0
    manifest_bytes: int = 0  # of stored_bytes, the manifest's (0 if this tree was stored before)
    new_bytes: int = 0  # of the tree's ``size``, the content the store did not hold yet
    reused_bytes: int = 0  # the rest: unchanged files and content deduplicated in the store
    raced_with: list[dict[str, Any]] = field(default_factory=list)
    killed: list[str] = field(default_factory=list)
    still_mounted: bool = False  # committed, but the unmount after it failed: see ``warning``
    warning: str = ""
    seconds: float = 0.0
    lazy: dict[str, Any] = field(default_factory=dict)  # a lazy mount's fetches, see filler

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)


@dataclass(slots=True)
class UnmountResult:
    """What an unmount discarded, and the processes it killed to do so."""

    key: str
    path: str
    discarded: bool = True
    killed: list[str] = field(default_factory=list)
    lazy: dict[str, Any] = field(default_factory=dict)  # a lazy mount's fetches, see filler

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)


@dataclass(slots=True)
class DiskSummary:
    """One disk as ``disk ls`` lists it: its latest generation and last use."""

    key: str
    generation: int
    generations: int
    size: int
    files: int
    last_used: float
    last_committed: float | None

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)


@dataclass(slots=True)
class DiskDiff:
    """What changed in a disk from generation ``gen_from`` to ``gen_to``."""

    key: str
    gen_from: int
    gen_to: int
    changes: Diff

    def as_dict(self) -> dict[str, Any]:
        """JSON form: ``key``, ``from``, ``to`` and the changed paths by kind."""
        return {"key": self.key, "from": self.gen_from, "to": self.gen_to,
                **self.changes.as_dict()}


@dataclass(slots=True)
class RemoveResult:
    """A disk forgotten by ``disk rm``."""

    key: str
    removed: bool = True

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)


@dataclass(slots=True)
class EvictResult:
    """The disks an eviction removed (or would remove), and the refs it could not read."""

    evicted: list[str]
    dry_run: bool
    kept: int
    skipped: dict[str, str] = field(default_factory=dict)  # ref name → why it was kept

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)


def _prepare_mount_path(path: Path) -> tuple[Path, list[Path]]:
    """The resolved mount path, and the directories created for it (deepest first)."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"mount path {path} is not a directory")
    path = path.absolute()
    made = [p for p in (path, *path.parents) if not os.path.lexists(p)]
    path.mkdir(parents=True, exist_ok=True)
    try:
        path = path.resolve()
        if (mounts.state_dir(path) / "state.json").exists():
            raise UsageError(f"{path} is already a stickyci mount; commit or unmount it first")
        if any(path.iterdir()):
            raise UsageError(f"mount path {path} is not empty; mount onto an empty directory")
    except BaseException:
        _remove_dirs(made)
        raise
    return path, made


def _remove_dirs(made: list[Path]) -> None:
    for d in made:
        try:
            d.rmdir()
        except OSError as exc:
            log.warning("could not remove %s after a failed mount: %s", d, exc.strerror)
            return


def _mount_at(path: Path) -> tuple[Path, mounts.MountState]:
    """The resolved path of a mount and its record. A commit that was killed while it had
    the mount sealed is undone first (:func:`_unseal`): the mount is as the job left it."""
    if not os.path.lexists(path):
        where = path.absolute()
        if (mounts.state_dir(where.parent.resolve() / where.name) / SEALED).exists():
            path.mkdir()  # killed as it moved a clone's tree away: its place, to put it back
    path = _existing_dir(path)
    state = mounts.load(path)
    _unseal(state, path)
    return path, state


def _existing_dir(path: Path) -> Path:
    if not path.exists():
        raise UsageError(f"path {path} does not exist")
    if not path.is_dir():
        raise UsageError(f"path {path} is not a directory")
    return path.resolve()


def mount(key: str, path: Path, *, strategy: str = "auto",
          store: str | Backend | None = None, trust_owners: bool = False) -> MountResult:
    """Mount a clone of the latest snapshot of ``key`` at ``path`` (empty if the key is new).

    Owners and setuid/setgid bits come from whoever committed the snapshot, so they are
    restored only with ``trust_owners`` (a ``/nix`` disk); otherwise the tree is the caller's.

    All or nothing: if any step fails, whatever was set up is undone before the error is
    raised, and ``path`` is as it was (or absent, if the mount created it).
    """
    start = time.perf_counter()
    refs.check_key(key)
    if strategy != "auto":
        strategies.get(strategy)
    budget = basecache.limit()  # configuration is checked before anything is mounted
    backend = as_backend(store)
    ref = refs.read_ref(backend, key)
    latest = ref.latest if ref else None
    snapshot = latest.snapshot if latest else None
    objects = ObjectStore(backend, load_index=False)
    if latest:
        objects.hint(latest.packs)

    def manifest() -> Manifest:
        return load_manifest(objects, snapshot) if snapshot else Manifest()

    path, made = _prepare_mount_path(path)
    state = mounts.MountState(key, str(path), backend.url, "", snapshot,
                              latest.gen if latest else 0, time.time(), trust_owners)
    try:
        # A cold base can be lazy: its skeleton now, content on first read (strategies/lazy).
        lazy = strategies.lazy_base(strategy, objects, snapshot, trust_owners, state.dir)
        # A cold copy mount is restored straight into the path, without a base to copy from.
        direct = not lazy and strategies.restore_direct(strategy, objects, snapshot, path,
                                                        state.dir, trust_owners)
        with (contextlib.nullcontext((lazy or path, False)) if lazy or direct
              else basecache.pinned(objects, snapshot, trust_owners)) as (base, cached):
            state.strategy = "copy" if direct else strategies.mount(
                "lazy" if lazy else strategy, base, path, state.dir, manifest,
                trust_owners=trust_owners)
            state.save()
        if ref:
            refs.touch(backend, key)
        if not cached:
            basecache.trim(budget)
    except BaseException:
        _undo_mount(state, path, made)
        raise
    return MountResult(key, str(path), state.strategy, state.base_gen,
                       snapshot.hex if snapshot else "", ref is None, cached,
                       time.perf_counter() - start)


def _undo_mount(state: mounts.MountState, path: Path, made: list[Path]) -> None:
    """Take down a mount that failed part way; ``path`` was empty (or absent) before it."""
    try:
        if state.strategy:
            strategies.get(state.strategy).unmount(path, state.dir)
        if not os.path.ismount(path):
            # A strategy that failed with something other than OSError leaves what it wrote.
            empty_dir(path)
        state.forget()
    except OSError as exc:
        log.warning("could not undo the failed mount at %s (%s); run `stickyci disk unmount "
                    "%s`", path, exc.strerror, path)
        return
    _remove_dirs(made)


def _ended(killed: list[holders.Holder]) -> list[str]:
    """The processes ``--kill-holders`` ended, as ``pid N (command), which held PATH``."""
    return [f"pid {h.pid} ({h.command}), which held {h.path}" for h in killed]


def _discard(state: mounts.MountState, path: Path) -> None:
    strategies.get(state.strategy).unmount(path, state.dir)
    state.forget()


def commit(path: Path, *, mode: str = "on-change", on_conflict: str = "lww",
           kill_holders: bool = False) -> CommitResult:
    """Store what changed at the mount ``path`` as a new generation, then unmount it.

    On any failure before the ref moves, the ref is unchanged and the mount is as it was.
    """
    start = time.perf_counter()
    if mode not in COMMIT_MODES:
        raise UsageError(f"unknown commit mode {mode!r}: use one of {', '.join(COMMIT_MODES)}")
    if on_conflict not in CONFLICT_MODES:
        raise UsageError(f"unknown conflict mode {on_conflict!r}: use lww or fail")
    path, state = _mount_at(path)
    strategy = strategies.get(state.strategy)
    if not strategy.is_mounted(path):
        raise UsageError(f"{path} was unmounted outside stickyci; run "
                         f"`stickyci disk unmount {path}` to clear its record")
    killed = _ended(holders.release(path, kill=kill_holders))
    result = CommitResult(state.key, str(path), False, "", killed=killed,
                          lazy=strategies.lazy_status(state.dir))
    backend = open_backend(state.store)
    current = refs.read_ref(backend, state.key)
    if mode == "if-missing" and current and current.latest:
        _discard(state, path)
        result.reason = "the disk already has a snapshot (if-missing)"
        result.seconds = time.perf_counter() - start
        return result

    objects = ObjectStore(backend, listing=False)  # the local index; check_present guards it
    # Read lazily: an overlay commit looks up only the paths it changed.
    base = load_manifest(objects, state.base, lazy=True) if state.base else Manifest()
    with _sealed(state, path) as sealed:  # from here until the ref moves, see _seal
        where = state.dir / SEALED_TREE if sealed and state.strategy in CLONES else path
        with ContentFill(objects, base) as fill:
            scan, content_root = strategy.changes(where, state.dir, base, state.trust_owners,
                                                  fill)
            fill.finish()
        changes = diff(base, scan.manifest, scan.touched)
        result.added, result.removed = len(changes.added), len(changes.removed)
        result.modified = len(changes.modified) + len(changes.metadata)
        # A new disk is created even when nothing was written to it, so that it exists from
        # now on (a later mount finds a generation, `disk rm` finds the disk).
        new_disk = not state.base and not (current and current.latest)
        if mode == "on-change" and changes.empty and not new_disk:
            # A cold copy mount leaves no base (it restores straight into the path): the
            # unchanged tree becomes one.
            if not _adopt_clone(state, path, state.base, scan.manifest.size, scan, sealed,
                                objects):
                _discard(state, path)
            result.reason = "nothing changed (on-change)"
            result.seconds = time.perf_counter() - start
            return result

        content_written = objects.bytes_written
        snapshot, hint = _save(objects, scan, content_root, state, current, base)
        result.manifest_bytes = objects.bytes_written - content_written
        files, size = scan.manifest.totals
        raced: list[Generation] = []

        def change(ref: DiskRef | None) -> DiskRef:
            nonlocal raced
            raced = [g for g in ref.generations if g.gen > state.base_gen] if ref else []
            if raced and on_conflict == "fail":
                gens = ", ".join(f"{g.gen} by {g.committer}" for g in raced)
                raise ConflictError(f"disk {state.key} was committed since this mount "
                                    f"(generation {gens}); nothing was changed. Use "
                                    "--on-conflict lww to win")
            now = time.time()
            new = ref or DiskRef(state.key, now, now)
            gen = Generation((new.latest.gen if new.latest else 0) + 1, snapshot, now, size,
                             files, objects.bytes_written,
                             f"{socket.gethostname()}:{os.getpid()}", refs.as_hint(hint))
            new.add(gen)
            new.last_used = now
            return new

        ref = refs.update_ref(backend, state.key, change)
    assert ref is not None and ref.latest is not None
    result.committed, result.reason = True, "committed"
    result.generation, result.snapshot = ref.latest.gen, snapshot.hex
    result.files, result.size = files, size
    result.stored_bytes, result.stored_objects = objects.bytes_written, objects.objects_written
    result.new_bytes = _new_content(objects, scan.todo)
    result.reused_bytes = max(size - result.new_bytes, 0)
    result.raced_with = [g.as_dict() for g in raced]
    if raced:
        log.warning("disk %s: this commit raced with generation(s) %s; last write wins, so "
                    "theirs are now history. Give each committing chain its own disk.",
                    state.key, ", ".join(str(g.gen) for g in raced))
    # The ref has moved: the commit has happened whatever the unmount does, and says so.
    try:
        _finish(state, path, snapshot, size, scan, base, sealed, objects)
    except (OSError, StickyError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        held = "; ".join(str(h) for h in holders.find(path)) or "no process holds it"
        result.still_mounted = True
        result.warning = (f"committed {state.key} generation {result.generation}, but {path} "
                          f"is still mounted ({why}; {held}); run `stickyci disk unmount "
                          f"{path}` once it is free")
        log.warning("%s", result.warning)
    result.seconds = time.perf_counter() - start
    return result


def _save(objects: ObjectStore, scan: Scan, content_root: Tree, state: mounts.MountState,
          current: DiskRef | None, base: Manifest) -> tuple[Digest, set[str]]:
    """Store the manifest of ``scan`` (the tree ``base`` became) once its content is stored,
    and check that everything the snapshot needs is in the store; return the snapshot and
    the packs holding it."""
    snapshot = save_manifest(objects, scan.manifest, base, scan.touched)
    # Objects the base generation references stay live while its ref keeps it, so only new
    # content can have been deduplicated against garbage a concurrent gc is sweeping.
    base_kept = not state.base or any(g.snapshot == state.base
                                      for g in (current.generations if current else []))
    fresh = scan.todo if base_kept else scan.manifest.entries.values()
    present = [snapshot.raw, *(bytes.fromhex(ref[0]) for e in fresh for ref in e.chunks)]
    try:
        packs = objects.check_present(present)
    except NotFound:
        # Deduplicated against a pack gc swept since this runner last listed the store (now
        # forgotten): store what changed again, against a fresh listing, and check again.
        objects.refresh()
        fill_content(objects, content_root, scan.todo)
        snapshot = save_manifest(objects, scan.manifest, base, scan.touched)
        packs = objects.check_present(present)
    # The base is in the ref only when the commit checked just what changed; then its hint
    # covers the rest.
    base_gen = next((g for g in current.generations if g.snapshot == state.base), None
                    ) if current and state.base else None
    return snapshot, (_pack_hint(objects, packs, base_gen, scan.manifest) if base_gen
                      else packs)


HINT_UNION = 256
"""Up to this many packs, a commit's hint adds the packs of what changed to its base's hint;
beyond, it locates every object again (so packs the snapshot no longer uses drop out)."""


def _pack_hint(objects: ObjectStore, packs: set[str], base: Generation,
               manifest: Manifest) -> set[str]:
    """The packs holding a new snapshot, from ``packs`` (those holding what the commit
    checked: what changed and the manifest) and, for the rest, ``base``'s hint or else
    every object located again; none when one is nowhere known."""
    hinted = packs | base.pack_names
    if not base.packs or len(hinted) > HINT_UNION:
        every = objects.packs_of(bytes.fromhex(ref[0]) for e in manifest.entries.values()
                                 for ref in e.chunks)
        hinted = packs | every if every is not None else set()
    return hinted


def _new_content(objects: ObjectStore, read: list[Entry]) -> int:
    """Bytes of content in the files ``read`` that this commit was first to store: chunks
    (or slices of bundles) whose objects are in the packs it wrote, each counted once."""
    written = {e.digest.hex for pack, index in objects.written.items()
               for e in decode_index(pack, index)}
    new = {(ref[0], ref[2] if len(ref) == 3 else 0): ref[1] for e in read for ref in e.chunks
           if ref[0] in written}
    return sum(new.values())


# Unmount retries after a commit: a process that was just leaving the mount (a shell's last
# command, a daemon stopping) usually lets go within a second.
UNMOUNT_BACKOFF = (0.05, 0.1, 0.2, 0.4, 0.8)


def _adopt_clone(state: mounts.MountState, path: Path, snapshot: Digest | None, size: int,
                 scan: Scan, sealed: bool | None, objects: ObjectStore) -> bool:
    """Move a clone mount's tree into the base cache as the base of ``snapshot`` (what
    ``scan`` walked, now committed), leaving ``path`` an empty dir; True if it did, or if
    the tree was sealed (:func:`_seal`): then ``path`` is left empty and the record gone
    whether the tree became a base or not."""
    if state.strategy not in CLONES:
        return False
    if sealed:
        if snapshot and scan.adoptable:
            basecache.publish(state.dir / SEALED_TREE, snapshot, size, trust_owners=False)
        state.forget()  # and with it the tree, if it was not published
        return True
    if not snapshot or not scan.adoptable:
        return False
    mode = path.stat().st_mode & 0o7777
    if not basecache.adopt(path, snapshot, size, scan, Content(objects, whole_pack=False)):
        return False
    path.mkdir(mode=mode)
    os.chmod(path, mode)
    state.forget()
    return True


SEALED = "sealed"
"""In a mount's dir: a commit sealed the mount to read it (``_seal``)."""
SEALED_TREE = "tree"
"""In a mount's dir: a clone's tree while a commit reads it (``_seal``)."""
CLONES = ("copy", "reflink")


@contextlib.contextmanager
def _sealed(state: mounts.MountState, path: Path) -> Iterator[bool | None]:
    """:func:`_seal` the mount for the block, and mount it again if the block fails; an
    unmounted overlay is freed while the block runs, and by its end."""
    sealed, teardown = _seal(state, path)
    try:
        yield sealed
    except BaseException:
        teardown.wait()  # a remount over the same upper dir finds it in no mount's use
        if sealed is not None:
            _unseal(state, path)
        raise
    teardown.wait()


def _seal(state: mounts.MountState, path: Path) -> tuple[bool | None, Teardown]:
    """Put the tree a commit is about to read out of every process's reach, so that the
    commit reads it once: what it reads is then what becomes the snapshot's base here.

    Read in place, the tree had to be checked again once out of reach (every entry walked,
    every file read re-hashed: 0.9 s of a 5 s first commit of the 1 GB benchmark tree). A
    clone's tree is moved into the mount's dir (an empty dir takes its place at ``path``). An
    overlay is unmounted, and its upper dir (a new disk's whole tree, or the changes to the
    base) is out of reach once nothing mounts or holds the overlay any more (a copy of the
    mount in another namespace, a file held open on it, a process in the upper dir itself):
    it is moved into the base cache as it is, or its files into the new base. True if sealed;
    False if the overlay is unmounted but still in use (its files are then copied, checked);
    None if the commit reads the tree in place (a lazy mount, or a busy one). With it, the
    unmounted overlay's :class:`Teardown`, started (``Teardown(None)`` for the others).
    """
    if state.strategy in CLONES:
        return _seal_clone(state, path), Teardown(None)
    if state.strategy != "overlay":
        return None, Teardown(None)
    dev = os.stat(path).st_dev
    marker = state.dir / SEALED
    marker.touch()  # first: a commit killed from here on leaves the overlay to be remounted
    try:
        teardown = detach(path)
    except OSError as exc:
        marker.unlink()
        if exc.errno == errno.EBUSY:
            return None, Teardown(None)
        raise
    try:
        # This process's clone of the mount is in no mount table, and its own fds are not
        # looked at: only others' use counts.
        live = holders.device_in_use(dev) or "; ".join(
            str(h) for h in holders.find(state.dir / "upper"))
    finally:
        teardown.start()
    if live:
        log.info("the committed tree of %s is copied into the base cache, not moved: the "
                 "overlay is still in use (%s)", state.key, live)
    return not live, teardown


def _seal_clone(state: mounts.MountState, path: Path) -> bool | None:
    tree = state.dir / SEALED_TREE
    st = os.stat(path)
    marker = state.dir / SEALED
    marker.touch()  # first: a commit killed from here on leaves the tree to be put back
    try:
        os.rename(path, tree)
    except OSError:  # another filesystem, a mount point: read it in place
        marker.unlink()
        return None
    try:
        path.mkdir(mode=0o700)
        os.chmod(path, stat.S_IMODE(st.st_mode))
        if os.geteuid() == 0:
            os.chown(path, st.st_uid, st.st_gid)
        entered = holders.find(tree)  # between the commit's check and the move
    except BaseException:
        _unseal(state, path)
        raise
    if entered:
        _unseal(state, path)
        return None
    return True


def _unseal(state: mounts.MountState, path: Path) -> bool:
    """Undo :func:`_seal` for a commit that did not commit (it failed, or was killed): the
    clone's tree back at ``path``, the overlay mounted again. False if nothing was sealed."""
    marker = state.dir / SEALED
    if not marker.exists():
        return False
    tree = state.dir / SEALED_TREE
    if state.strategy in CLONES:
        if tree.is_dir():
            os.rename(tree, path)  # over the empty dir that took its place
    elif not os.path.ismount(path):
        Overlay().remount(basecache.base_path(state.base, state.trust_owners), path, state.dir)
    marker.unlink()
    return True


def _finish(state: mounts.MountState, path: Path, snapshot: Digest, size: int, scan: Scan,
            base: Manifest, sealed: bool | None, objects: ObjectStore) -> None:
    """Unmount after a commit; the committed tree becomes the new snapshot's base when it can
    (a clone or a sealed upper dir is moved into the base cache, an overlay's changes patch
    its old base)."""
    # The ref has moved: from here on a failure must not put the mount back for another
    # commit of the same tree.
    (state.dir / SEALED).unlink(missing_ok=True)
    if _adopt_clone(state, path, snapshot, size, scan, sealed, objects):
        return
    if sealed is None:
        for delay in (*UNMOUNT_BACKOFF, None):
            try:
                strategies.get(state.strategy).unmount(path, state.dir)
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or delay is None:
                    raise
                time.sleep(delay)
    elif (sealed and not state.base and not state.trust_owners and scan.adoptable
          and basecache.publish(state.dir / "upper", snapshot, size, trust_owners=False)):
        state.forget()  # a new disk's whole tree, moved as it is
        return
    touched = scan.touched
    if state.strategy in ("overlay", "lazy") and touched is not None:
        basecache.adopt_changes(
            state.base, snapshot, size, state.trust_owners, state.path,
            lambda tree: apply_upper(tree, state.dir / "upper", base, scan.manifest, touched,
                                     state.trust_owners, Content(objects, whole_pack=False),
                                     sealed=bool(sealed)))
    state.forget()


def unmount(path: Path, *, kill_holders: bool = False) -> UnmountResult:
    """Discard the mount at ``path`` without committing."""
    path, state = _mount_at(path)
    killed = _ended(holders.release(path, kill=kill_holders))
    lazy = strategies.lazy_status(state.dir)
    _discard(state, path)
    return UnmountResult(state.key, str(path), killed=killed, lazy=lazy)


def _require(backend: Backend, key: str) -> DiskRef:
    ref = refs.read_ref(backend, key)
    if ref is None:
        raise _no_such_disk(key)
    return ref


def _no_such_disk(key: str) -> NotFound:
    return NotFound(f"disk {key} does not exist; `stickyci disk ls` lists the disks")


def list_disks(store: str | Backend | None = None) -> list[DiskSummary]:
    """One summary per disk.

    A ref that does not parse is left out and logged as a warning naming it.
    """
    rows = []
    for ref in refs.list_refs(as_backend(store)):
        latest = ref.latest
        rows.append(DiskSummary(ref.key, latest.gen if latest else 0, len(ref.generations),
                                latest.size if latest else 0, latest.files if latest else 0,
                                ref.last_used, latest.committed_at if latest else None))
    return rows


@dataclass(slots=True)
class DiskView:
    """A disk as ``disk show`` tells it: its ref and, if asked, its lazy mounts on this machine
    with what their fillers fetched."""

    ref: DiskRef
    lazy_mounts: list[dict[str, Any]] | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON form: the ref's, and ``lazy_mounts`` if they were asked for."""
        extra = {} if self.lazy_mounts is None else {"lazy_mounts": self.lazy_mounts}
        return {**self.ref.as_dict(), **extra}


def show(key: str, store: str | Backend | None = None, *, here: bool = False) -> DiskView:
    """A disk's generations, sizes and last use; with ``here``, also how far the fills of its
    lazy mounts on this machine are."""
    backend = as_backend(store)
    ref = _require(backend, refs.check_key(key))
    return DiskView(ref, strategies.lazy_mounts(key, backend.url) if here else None)


def diff_disk(key: str, gen_a: int | None = None, gen_b: int | None = None,
              store: str | Backend | None = None) -> DiskDiff:
    """What changed between two generations (default: the previous and the latest)."""
    backend = as_backend(store)
    ref = _require(backend, refs.check_key(key))
    assert ref.latest is not None
    b = gen_b if gen_b is not None else ref.latest.gen
    a = gen_a if gen_a is not None else b - 1
    objects = ObjectStore(backend)

    def tree(gen: int) -> Manifest:
        if gen == 0:
            return Manifest()
        g = ref.generation(gen)
        if g is None:
            kept = ", ".join(str(x.gen) for x in ref.generations)
            raise NotFound(f"disk {key} has no generation {gen}; kept generations: {kept}")
        return load_manifest(objects, g.snapshot)

    return DiskDiff(key, a, b, diff(tree(a), tree(b)))


def remove(key: str, store: str | Backend | None = None) -> RemoveResult:
    """Forget a disk; its objects are reclaimed by the next gc. Works on a malformed ref too."""
    backend = as_backend(store)
    if not refs.exists(backend, key):
        raise _no_such_disk(key)
    refs.delete_ref(backend, key)
    return RemoveResult(key)


def evict(ttl: float, *, dry_run: bool = False,
          store: str | Backend | None = None) -> EvictResult:
    """Remove disks not used for ``ttl`` seconds.

    A ref that does not parse has no usable ``last_used``: it is kept, not evicted, and listed
    under ``skipped`` (ref name → reason) for an admin to inspect or ``disk rm``.
    """
    backend = as_backend(store)
    found = refs.scan_refs(backend)
    stale = policy.unused_for(
        (policy.Used(r.key, r.latest.size if r.latest else 0, r.last_used) for r in found.refs),
        time.time(), ttl)
    if not dry_run:
        for key in stale:
            refs.delete_ref(backend, key)
    return EvictResult(stale, dry_run, len(found.refs) - len(stale), found.skipped)
