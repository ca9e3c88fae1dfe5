"""The local base cache: snapshots materialised on this machine, reused by later mounts.

``bases/<snapshot>/`` is a complete tree, published by an atomic rename once fully written,
and never modified afterwards (overlay mounts use it as their read-only lower layer).
``bases/<snapshot>.json`` records its size; its mtime is the last use, for trimming the
cache to its budget, least recently used first. A base named by a live mount is never
trimmed. Snapshots arrive here as :class:`Digest` values only, so every name under
``bases/`` is 64 hex characters or ``empty``, whatever a ref held.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ..digest import Digest
from ..errors import IntegrityError, StickyError, UsageError
from ..forked import PARALLEL_MIN_BYTES, forked_runs
from ..fsutil import Opener, Tree, remove_tree
from ..paths import cache_home
from ..snapshot import Content, Entry, Scan, load_manifest, restore
from ..store import ObjectStore
from ..units import parse_size
from . import holders, mounts
from .policy import Used, over_budget

DEFAULT_LIMIT = "20G"
EMPTY = "empty"
OWNERS_SUFFIX = ".owners"
log = logging.getLogger("stickyci")


def bases_root() -> Path:
    """Where bases live."""
    return cache_home() / "bases"


def limit() -> int:
    """The size budget (``STICKYCI_BASE_CACHE_SIZE``, default 20G)."""
    text = os.environ.get("STICKYCI_BASE_CACHE_SIZE", DEFAULT_LIMIT)
    try:
        return parse_size(text)
    except UsageError as exc:
        raise UsageError(f"STICKYCI_BASE_CACHE_SIZE: {exc}") from None


def name_of(snapshot: Digest | None, trust_owners: bool = False) -> str:
    """The name of a snapshot's base under ``bases/`` (``EMPTY`` for a fresh disk).

    A base restored with the manifest's owners and setuid/setgid bits is another tree than one
    restored without them, so it has its own name: a mount that does not trust owners never
    gets a base that does.
    """
    if not snapshot:
        return EMPTY
    return f"{snapshot.hex}{OWNERS_SUFFIX}" if trust_owners else snapshot.hex


def _live(ignore: str = "") -> set[str]:
    """Bases live mounts (but the one at ``ignore``) may use; a record does not say whether it
    trusts owners."""
    return {name_of(m.base, trust) for m in mounts.all_mounts() if m.path != ignore
            for trust in (False, True)}


def base_path(snapshot: Digest | None, trust_owners: bool = False) -> Path:
    """The tree of a base (``EMPTY`` for a fresh disk)."""
    return bases_root() / name_of(snapshot, trust_owners)


@contextlib.contextmanager
def _lock(name: str, kind: str = "lock", how: int = fcntl.LOCK_EX) -> Iterator[bool]:
    """Hold a flock on ``.<name>.<kind>``; yields False if ``how`` has LOCK_NB and it is taken."""
    root = bases_root()
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / f".{name}.{kind}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, how)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


@contextlib.contextmanager
def pinned(objects: ObjectStore, snapshot: Digest | None,
           trust_owners: bool = False) -> Iterator[tuple[Path, bool]]:
    """The base tree of ``snapshot`` (materialised if needed) and whether it was cached.

    The base cannot be trimmed while the block runs: a mount pins its base this way until its
    record, which protects the base from then on, is saved.
    """
    with _lock(name_of(snapshot, trust_owners), "pin", fcntl.LOCK_SH):
        yield _ensure(objects, snapshot, trust_owners)


def _ensure(objects: ObjectStore, snapshot: Digest | None,
            trust_owners: bool) -> tuple[Path, bool]:
    path = base_path(snapshot, trust_owners)
    if path.is_dir():
        _touch(path)
        return path, True
    with _lock(name_of(snapshot, trust_owners)):
        if path.is_dir():
            _touch(path)
            return path, True
        tmp = bases_root() / f".tmp-{name_of(snapshot, trust_owners)}-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        try:
            size = 0
            if snapshot:
                m = load_manifest(objects, snapshot)
                restore(objects, m, str(tmp), trust_owners=trust_owners)
                size = m.size
            os.rename(tmp, path)
        except BaseException:
            remove_tree(tmp)
            raise
        Path(f"{path}.json").write_text(json.dumps({"size": size}))
        return path, False


def adopt(tree: Path, snapshot: Digest, size: int, scan: Scan, content: Content) -> bool:
    """Publish an existing tree (a just-committed copy mount) as the base of ``snapshot``.

    The tree is first moved out of reach of the paths processes use, then checked: no
    process may still hold anything in it (an open file could be written after the check),
    it must still be the tree ``scan`` walked, and the files whose content the commit read
    must still hold the chunks it stored (``content`` reads the bundles of small files). If
    any check fails it is dropped, as a base must match its manifest. True if ``tree`` was
    moved away (published or dropped).
    """
    path = base_path(snapshot)
    with _lock(snapshot.hex):
        if path.exists():
            return False
        tmp = bases_root() / f".tmp-{snapshot.hex}-{uuid.uuid4().hex}"
        try:
            os.rename(tree, tmp)
        except OSError:
            return False
        try:
            ok = not holders.find(tmp) and scan.unchanged(tmp) and _holds(tmp, scan.todo, content)
        except (OSError, StickyError) as exc:
            log.info("the committed tree of %s is not kept as a base: %s", snapshot, exc)
            ok = False
        if not ok:
            remove_tree(tmp)
            return True
        os.rename(tmp, path)
        Path(f"{path}.json").write_text(json.dumps({"size": size}))
        return True


def _holds(tree: Path, files: list[Entry], content: Content) -> bool:
    """True if every file in ``files`` under ``tree`` holds exactly its chunks (read on
    every core when they are many: a whole tree, for a new disk's copy mount)."""
    def check(run: Iterable[Entry]) -> None:
        with Opener(Tree.at(tree)) as op:
            for e in run:
                fd = op.open(e.path, os.O_RDONLY)
                try:
                    # A short read is a changed file too: it cannot match.
                    if (not all(content.holds(ref, os.read(fd, ref[1]), e.path)
                                for ref in e.chunks) or os.read(fd, 1)):
                        raise IntegrityError(f"{e.path} changed after the commit read it")
                finally:
                    os.close(fd)

    try:
        if sum(e.size for e in files) < PARALLEL_MIN_BYTES:
            check(files)
        else:
            forked_runs(files, check)
    except IntegrityError as exc:
        log.info("%s", exc)
        return False
    return True


def adopt_changes(old: Digest | None, snapshot: Digest, size: int, trust_owners: bool,
                  mount: str, patch: Callable[[Path], None]) -> bool:
    """Make the base of ``snapshot`` from the base of ``old`` and the changes a commit of the
    mount at ``mount`` (an overlay, now unmounted) stored: ``patch`` applies them to a tree.

    The old base is taken over, not copied, when no other mount uses it or is being set up
    on it (a fresh disk's changes start from an empty tree); otherwise nothing is adopted and
    the next mount restores the snapshot as before. A base that ``patch`` cannot complete is
    dropped. True if the new snapshot has a base now.
    """
    name = name_of(snapshot, trust_owners)
    path = bases_root() / name
    with _lock(name):
        if path.is_dir():
            _touch(path)
            return True
        tmp = bases_root() / f".tmp-{name}-{uuid.uuid4().hex}"
        # The commit has happened: whatever goes wrong here only costs the next mount a restore.
        try:
            if not _take(name_of(old, trust_owners) if old else None, tmp, mount):
                return False
            patch(tmp)
            os.rename(tmp, path)
            Path(f"{path}.json").write_text(json.dumps({"size": size}))
        except (OSError, StickyError) as exc:
            log.info("the committed tree of %s is not kept as a base: %s", snapshot, exc)
            remove_tree(tmp)
            return False
        except BaseException:
            remove_tree(tmp)
            raise
    with contextlib.suppress(UsageError, OSError):
        trim()
    return True


def _take(old: str | None, tmp: Path, mount: str) -> bool:
    """Move the base ``old`` (None: an empty tree) to ``tmp``, if no mount but ``mount`` uses
    it and none is pinning it; True if it was moved."""
    if old is None:
        tmp.mkdir()
        return True
    with _lock(old, "pin", fcntl.LOCK_EX | fcntl.LOCK_NB) as free, \
            _lock(old, "lock", fcntl.LOCK_EX | fcntl.LOCK_NB) as mine:
        path = bases_root() / old
        if not (free and mine) or old in _live(ignore=mount) or not path.is_dir():
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}.json")
        os.rename(path, tmp)
        return True


def publish(tree: Path, snapshot: Digest, size: int, trust_owners: bool) -> bool:
    """Move a complete tree written elsewhere (a lazily filled base, a sealed overlay's upper
    dir) into place as the base of ``snapshot``, unless it has one already; True if it was
    moved."""
    path = base_path(snapshot, trust_owners)
    with _lock(name_of(snapshot, trust_owners)):
        if path.exists():
            return False
        os.rename(tree, path)
        Path(f"{path}.json").write_text(json.dumps({"size": size}))
        return True


def _touch(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.utime(f"{path}.json")


def entries() -> list[Used]:
    """Every base with its size and last use."""
    out: list[Used] = []
    root = bases_root()
    if not root.is_dir():
        return out
    for meta in root.glob("*.json"):
        try:
            size = json.loads(meta.read_text())["size"]
            out.append(Used(meta.name.removesuffix(".json"), size, meta.stat().st_mtime))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def trim(budget: int | None = None) -> list[str]:
    """Drop least recently used bases over the budget, never one a live mount uses.

    Trimming keeps a cache under its size; *eviction* is reserved for disks removed from the
    store when unused for a TTL (:func:`stickyci.disks.evict`).
    """
    in_use = _live()
    drop = over_budget(entries(), limit() if budget is None else budget, in_use)
    for name in drop:
        with _lock(name, "pin", fcntl.LOCK_EX | fcntl.LOCK_NB) as free, _lock(name):
            if not free or name in _live():
                continue
            path = bases_root() / name
            # Rename first so a half-deleted tree is never taken for a base.
            doomed = bases_root() / f".gone-{uuid.uuid4().hex}"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{path}.json")
                os.rename(path, doomed)
            remove_tree(doomed)
    _sweep_abandoned()
    return drop


TRASH_AGE = 3600.0
"""Trash untouched this many seconds has lost the background ``rm`` that was deleting it."""


def _sweep_abandoned() -> None:
    """Remove half-materialised bases whose writer died (its snapshot lock is free), and
    trash whose background ``rm`` died: nothing else would ever delete either."""
    for tmp in bases_root().glob(".tmp-*"):
        snapshot = tmp.name.split("-")[1]
        with _lock(snapshot, "lock", fcntl.LOCK_EX | fcntl.LOCK_NB) as free:
            if free:
                remove_tree(tmp)
    sweep_trash(time.time())


def sweep_trash(now: float) -> None:
    """Delete the trash (``.gone-*`` bases, mounts' ``.trash``) untouched for ``TRASH_AGE``
    at ``now``: its ``rm`` died (a reboot, the OOM killer mid-delete).

    Untouched by the inode's change time: moving a tree to the trash keeps its mtime (a base's
    root has its snapshot's, often days old) but sets its ctime, and the ``rm`` changes it
    again with every entry it removes there; by mtime, a tree moved a second ago would be
    deleted here, in the way of a mount, while its ``rm`` was still at work."""
    for trash in (*bases_root().glob(".gone-*"), *(mounts.mounts_root() / ".trash").glob("*")):
        with contextlib.suppress(OSError):
            if trash.lstat().st_ctime < now - TRASH_AGE:
                remove_tree(trash)
