"""Building a snapshot: chunk and store file content in parallel, then store the manifest.

Big jobs run in forked workers (``stickyci.forked``). Each inherits the store's index, so it
skips objects stored before the commit, and writes its own packs; the parent then reloads the
index.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .. import chunking
from ..digest import Digest
from ..forked import PARALLEL_MIN_BYTES, aborted, forked_map
from ..store import ObjectStore
from .model import FILE, ChunkRef, Entry, Manifest
from .scan import is_special, skip_special, to_entry, walk

# Reading small files whole is cheaper than mapping them; big ones are mapped to bound memory.
_MMAP_MIN = 8 << 20
_BATCH_BYTES = 32 << 20

Reuse = Callable[[Entry, os.stat_result], Entry | None]


def store_file(store: ObjectStore, path: str) -> tuple[int, list[ChunkRef]]:
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
            chunks = [[store.put(piece).hex, len(piece)] for piece in chunking.cut(view)]
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

    if sum(e.size for e in todo) < PARALLEL_MIN_BYTES:
        for e in todo:
            e.size, e.chunks = store_file(store, os.path.join(root, e.path))
    else:
        _fill_forked(store, root, todo)
    for e in followers:
        leader = leaders[e.link]
        e.size, e.chunks = leader.size, leader.chunks


@dataclass(slots=True)
class Scan:
    """A described tree, the file entries whose content must still be read, what was skipped,
    and, when the scanner knows it, the only paths that can differ from the base.
    """

    manifest: Manifest = field(default_factory=Manifest)
    todo: list[Entry] = field(default_factory=list)
    skipped: int = 0
    touched: set[str] | None = None


Packs = list[tuple[str, list[tuple[bytes, int, int]]]]


def _fill_forked(store: ObjectStore, root: str, todo: list[Entry]) -> None:
    store.flush()
    batches = list(_batches(todo, _BATCH_BYTES))

    def work(i: int) -> tuple[int, list[tuple[int, list[ChunkRef]]], int, int, Packs]:
        before = store.bytes_written, store.objects_written
        known = set(store.written)
        out = []
        for e in batches[i]:
            if aborted():  # another batch failed: the commit is over, publish nothing more
                return i, [], 0, 0, []
            out.append(store_file(store, os.path.join(root, e.path)))
        store.flush()  # each batch ends in a published pack: the parent sees only those
        packs = [(p, entries) for p, entries in store.written.items() if p not in known]
        return (i, out, store.bytes_written - before[0], store.objects_written - before[1],
                packs)

    for i, out, nbytes, nobjects, packs in forked_map(work, range(len(batches))):
        for e, (size, chunks) in zip(batches[i], out, strict=True):
            e.size, e.chunks = size, chunks
        store.bytes_written += nbytes
        store.objects_written += nobjects
        # The worker's packs are indexed from what it sent back, not re-read from the store.
        for pack, entries in packs:
            store.adopt(pack.removeprefix("packs/"), entries)
    store.refresh()


def _batches(entries: list[Entry], limit: int) -> Iterable[list[Entry]]:
    """Groups of files of about ``limit`` bytes, so each task is worth its overhead."""
    group: list[Entry] = []
    size = 0
    for e in entries:
        group.append(e)
        size += e.size + 4096
        if size >= limit:
            yield group
            group, size = [], 0
    if group:
        yield group


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
