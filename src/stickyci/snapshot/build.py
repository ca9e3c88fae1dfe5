"""Building a snapshot: chunk and store file content in parallel, then store the manifest."""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .. import chunking
from ..digest import Digest
from ..store import ObjectStore
from .model import FILE, Entry, Manifest
from .scan import is_special, skip_special, to_entry, walk

# Reading small files whole is cheaper than mapping them; big ones are mapped to bound memory.
_MMAP_MIN = 8 << 20
WORKERS = min(8, 2 * (os.cpu_count() or 1))

Reuse = Callable[[Entry, os.stat_result], Entry | None]


def store_file(store: ObjectStore, path: str) -> tuple[int, list[tuple[str, int]]]:
    """Chunk one file into the store; return its size and chunk list."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0, []
        mapped = None
        if size < _MMAP_MIN:
            data = os.read(fd, size + 1)
            if len(data) > size:  # the file grew since fstat
                data += _read_rest(fd)
            view = memoryview(data)
        else:
            mapped = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
            view = memoryview(mapped)
        try:
            chunks = [(store.put(piece).hex, len(piece)) for piece in chunking.cut(view)]
            return len(view), chunks
        finally:
            view.release()
            if mapped is not None:
                mapped.close()
    finally:
        os.close(fd)


def _read_rest(fd: int) -> bytes:
    parts = []
    while block := os.read(fd, 1 << 20):
        parts.append(block)
    return b"".join(parts)


def fill_content(store: ObjectStore, root: str, entries: Iterable[Entry]) -> None:
    """Store the content of ``entries`` (files under ``root``), hardlinked content once."""
    leaders: dict[int, Entry] = {}
    todo: list[Entry] = []
    followers: list[Entry] = []
    for e in entries:
        if e.link and e.link in leaders:
            followers.append(e)
            continue
        if e.link:
            leaders[e.link] = e
        todo.append(e)

    def one(e: Entry) -> None:
        e.size, e.chunks = store_file(store, os.path.join(root, e.path))

    with ThreadPoolExecutor(WORKERS) as pool:
        for _ in pool.map(one, todo):
            pass
    for e in followers:
        leader = leaders[e.link]
        e.size, e.chunks = leader.size, leader.chunks


@dataclass(slots=True)
class Scan:
    """A described tree, the file entries whose content must still be read, and what was skipped."""

    manifest: Manifest = field(default_factory=Manifest)
    todo: list[Entry] = field(default_factory=list)
    skipped: int = 0


def scan_tree(root: str, reuse: Reuse | None = None) -> Scan:
    """Describe ``root``; ``reuse`` may return a previous entry for a file it knows is unchanged,
    whose chunks are then kept instead of read again.
    """
    out = Scan()
    m, todo = out.manifest, out.todo
    groups: dict[tuple[int, int], int] = {}
    for path, st in walk(root):
        if is_special(st):
            skip_special(path, st)
            out.skipped += 1
            continue
        e = to_entry(root, path, st)
        if e.kind == FILE:
            if st.st_nlink > 1:
                e.link = groups.setdefault((st.st_dev, st.st_ino), len(groups) + 1)
            old = reuse(e, st) if reuse else None
            if old is not None and old.size == e.size:
                e.chunks = old.chunks
            else:
                todo.append(e)
        m.entries[path] = e
    return out


def save_manifest(store: ObjectStore, m: Manifest) -> Digest:
    """Store the manifest, flush every pending pack, and return the snapshot id."""
    d = store.put(m.encode())
    store.flush()
    return d


def snapshot_tree(store: ObjectStore, root: str,
                  reuse: Reuse | None = None) -> tuple[Digest, Manifest]:
    """Scan, store and save ``root`` in one go."""
    scan = scan_tree(root, reuse)
    fill_content(store, root, scan.todo)
    return save_manifest(store, scan.manifest), scan.manifest


def load_manifest(store: ObjectStore, snapshot: Digest) -> Manifest:
    """Read and validate a snapshot's manifest."""
    return Manifest.decode(store.get(snapshot), f"snapshot {snapshot}")
