"""The local base cache: snapshots materialised on this machine, reused by later mounts.

``bases/<snapshot>/`` is a complete tree, published by an atomic rename once fully written,
and never modified afterwards (overlay mounts use it as their read-only lower layer).
``bases/<snapshot>.json`` records its size; its mtime is the last use, for LRU eviction.
A base named by a live mount is never evicted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from ..digest import Digest
from ..fsutil import remove_tree
from ..snapshot import load_manifest, restore
from ..store import ObjectStore, cache_home
from ..units import parse_size
from . import mounts
from .policy import Used, over_budget

DEFAULT_LIMIT = "20G"
EMPTY = "empty"


def bases_root() -> Path:
    """Where bases live."""
    return cache_home() / "bases"


def limit() -> int:
    """The size budget (``STICKYCI_BASE_CACHE_SIZE``, default 20G)."""
    return parse_size(os.environ.get("STICKYCI_BASE_CACHE_SIZE", DEFAULT_LIMIT))


def base_path(snapshot: str) -> Path:
    """The tree of a base (``EMPTY`` for a fresh disk)."""
    return bases_root() / (snapshot or EMPTY)


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
def pinned(store: ObjectStore, snapshot: str) -> Iterator[tuple[Path, bool]]:
    """The base tree of ``snapshot`` (materialised if needed) and whether it was cached.

    The base cannot be evicted while the block runs: a mount pins its base this way until its
    record, which protects the base from then on, is saved.
    """
    with _lock(snapshot or EMPTY, "pin", fcntl.LOCK_SH):
        yield _ensure(store, snapshot)


def _ensure(store: ObjectStore, snapshot: str) -> tuple[Path, bool]:
    path = base_path(snapshot)
    if path.is_dir():
        _touch(path)
        return path, True
    with _lock(snapshot or EMPTY):
        if path.is_dir():
            _touch(path)
            return path, True
        tmp = bases_root() / f".tmp-{snapshot}-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        try:
            size = 0
            if snapshot:
                m = load_manifest(store, Digest.parse(snapshot))
                restore(store, m, str(tmp))
                size = m.size
            os.rename(tmp, path)
        except BaseException:
            remove_tree(tmp)
            raise
        Path(f"{path}.json").write_text(json.dumps({"size": size}))
        return path, False


def adopt(tree: Path, snapshot: str, size: int) -> bool:
    """Publish an existing tree (a just-committed copy mount) as the base of ``snapshot``."""
    path = base_path(snapshot)
    with _lock(snapshot):
        if path.exists():
            return False
        try:
            os.rename(tree, path)
        except OSError:
            return False
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
        except (OSError, ValueError, KeyError):
            continue
    return out


def evict(budget: int | None = None) -> list[str]:
    """Drop least recently used bases over the budget, never one a live mount uses."""
    in_use = {m.base or EMPTY for m in mounts.all_mounts()}
    drop = over_budget(entries(), limit() if budget is None else budget, in_use)
    for name in drop:
        with _lock(name, "pin", fcntl.LOCK_EX | fcntl.LOCK_NB) as free, _lock(name):
            if not free or name in {m.base or EMPTY for m in mounts.all_mounts()}:
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


def _sweep_abandoned() -> None:
    """Remove half-materialised bases whose writer died (its snapshot lock is free)."""
    for tmp in bases_root().glob(".tmp-*"):
        snapshot = tmp.name.split("-")[1]
        with _lock(snapshot, "lock", fcntl.LOCK_EX | fcntl.LOCK_NB) as free:
            if free:
                remove_tree(tmp)
