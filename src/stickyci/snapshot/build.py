"""Building a snapshot: chunk and store file content in parallel, then store the manifest.

Big jobs run in forked workers (``stickyci.forked``). Each inherits the store's index, so it
skips objects stored before the commit, and writes its own packs; the parent then reloads the
index.
Content is read through ``fsutil.Opener``: every path is resolved from the tree's root one
component at a time without following symlinks, in the parent and in each worker alike.
"""

from __future__ import annotations

import gc
import mmap
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .. import chunking, codec
from ..digest import Digest
from ..forked import PARALLEL_MIN_BYTES, aborted, forked_map
from ..fsutil import Opener, Tree
from ..store import ObjectStore
from .model import FILE, ChunkRef, Entry, Manifest, paused_gc
from .scan import is_special, keep_base_meta, skip_special, to_entry

# Reading small files whole is cheaper than mapping them; big ones are mapped to bound memory.
_MMAP_MIN = 8 << 20
_BATCH_BYTES = 32 << 20
# A manifest is mostly hex digests: zstd -1 packs it as small as -3 does, 2.4x faster (the
# 6.4 MB manifest of the 1 GB benchmark tree: 1.90 MB in 11 ms, against 1.96 MB in 27 ms).
_MANIFEST_LEVEL = 1
_ROOT = os.geteuid() == 0

Reuse = Callable[[Entry, os.stat_result], Entry | None]


def store_file(store: ObjectStore, opener: Opener, path: str) -> tuple[int, list[ChunkRef]]:
    """Chunk the file at ``path`` below the opener's tree into the store; return its size and
    chunk list."""
    fd = opener.open(path, os.O_RDONLY)
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


def fill_content(store: ObjectStore, root: Tree | str, entries: Iterable[Entry]) -> None:
    """Store the content of ``entries`` (files under ``root``), hardlinked content once."""
    tree = root if isinstance(root, Tree) else Tree.at(root)
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

    try:
        if sum(e.size for e in todo) < PARALLEL_MIN_BYTES:
            with Opener(tree) as opener:
                for e in todo:
                    e.size, e.chunks = store_file(store, opener, e.path)
        else:
            _fill_forked(store, tree, todo)
    except BaseException:
        store.settle()
        raise
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
    # (type and mode, inode, ctime, size) of every entry as scanned, when the scan was a walk
    seen: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)

    def saw(self, path: str, st: os.stat_result) -> None:
        """Record an entry of the walked tree, for :meth:`unchanged`."""
        self.seen[path] = _identity(st)

    def unchanged(self, root: Path) -> bool:
        """True if the tree at ``root`` is still exactly the tree this scan walked.

        Any change to an entry since (a write, chmod, rename, link or unlink) moves its ctime,
        which no process can set back, and a new entry is not in ``seen``.
        """
        return {f.path: _identity(f.stat) for f in Tree.at(root).walk()} == self.seen

    @property
    def adoptable(self) -> bool:
        """True if the scanned tree can become a base as it is: nothing was left out, and it
        is what a restore without ``trust_owners`` writes (no setuid/setgid bit, every owner
        the user restoring; a user who is not root never sets owners)."""
        me = (os.geteuid(), os.getegid())
        return self.skipped == 0 and not any(
            e.mode & 0o6000 or (_ROOT and (e.uid, e.gid) != me)
            for e in self.manifest.entries.values())


Packs = list[tuple[str, bytes]]  # a pack a forked worker wrote, and its index as stored


def _fill_forked(store: ObjectStore, tree: Tree, todo: list[Entry]) -> None:
    store.flush()
    batches = _batches(todo, _BATCH_BYTES)

    def work(i: int) -> tuple[int, list[tuple[int, list[ChunkRef]]], int, int, Packs]:
        before = store.bytes_written, store.objects_written
        known = set(store.written)
        out = []
        # Failing or aborted, this worker may end next (os._exit): no pack write cut off.
        try:
            with Opener(tree) as opener:
                for e in batches[i]:
                    if aborted():  # another batch failed: the commit is over, publish nothing more
                        store.settle()
                        return i, [], 0, 0, []
                    out.append(store_file(store, opener, e.path))
        except BaseException:
            store.settle()
            raise
        store.flush()  # each batch ends in a published pack: the parent sees only those
        packs = [(p, index) for p, index in store.written.items() if p not in known]
        return (i, out, store.bytes_written - before[0], store.objects_written - before[1],
                packs)

    # What exists now (the manifest's entries above all) is left out of every collection, in
    # the workers and here: a worker's collector would otherwise walk, and so copy, each page
    # it inherited, and this process's would walk them again as the batches' results come in
    # (the 1 GB benchmark tree: collections here 0.19 s, frozen 0.05 s; 1.3 GB of a Rust
    # toolchain: 0.42 s, 0.15 s).
    gc.freeze()
    try:
        for i, out, nbytes, nobjects, packs in forked_map(work, range(len(batches))):
            for e, (size, chunks) in zip(batches[i], out, strict=True):
                e.size, e.chunks = size, chunks
            store.bytes_written += nbytes
            store.objects_written += nobjects
            # The worker's packs are indexed from what it sent back, not re-read from the store.
            for pack, index in packs:
                store.adopt(pack.removeprefix("packs/"), index)
    finally:
        gc.unfreeze()
    store.refresh()


def _batches(entries: list[Entry], limit: int) -> list[list[Entry]]:
    """Runs of neighbouring files of about ``limit`` bytes each, so each task is worth its
    overhead, largest first; a file of ``limit`` or more is a task of its own.

    Alone, a big file leaves the small files around it to the other workers: in the run it
    joined, one worker read them all (an incremental commit of a rebuilt 50 MiB binary and
    332 small files ran on one worker, the other idle). The order is the
    longest-processing-time rule: a big task handed out last would leave one worker
    compressing it while the others have nothing left to do; small runs last even the
    workers out.
    """
    groups: list[tuple[int, list[Entry]]] = []
    group: list[Entry] = []
    size = 0
    for e in entries:
        cost = e.size + 4096  # a file's own overhead (open, stat, a row) counts too
        if cost >= limit:
            groups.append((cost, [e]))
            continue
        group.append(e)
        size += cost
        if size >= limit:
            groups.append((size, group))
            group, size = [], 0
    if group:
        groups.append((size, group))
    groups.sort(key=lambda g: g[0], reverse=True)  # stable: equal sizes keep their order
    return [g for _, g in groups]


def scan_tree(root: Tree | str, reuse: Reuse | None = None,
              base: Manifest | None = None) -> Scan:
    """Describe ``root``; ``reuse`` may return a previous entry for a file it knows is unchanged,
    whose chunks and metadata are then kept instead of read again. Directories and symlinks
    keep the metadata of their entry in ``base`` where the disk shows only what a restore of
    it wrote (``keep_base_meta``).
    """
    tree = root if isinstance(root, Tree) else Tree.at(root)
    out = Scan()
    with paused_gc():  # an entry per path: tens of thousands of objects, none of them cyclic
        _scan_into(out, tree, reuse, base)
    return out


def _scan_into(out: Scan, tree: Tree, reuse: Reuse | None, base: Manifest | None) -> None:
    m, todo = out.manifest, out.todo
    groups: dict[tuple[int, int], int] = {}
    for found in tree.walk():
        path, st = found.path, found.stat
        out.saw(path, st)
        if is_special(st):
            skip_special(path, st)
            out.skipped += 1
            continue
        e = to_entry(found)
        if base is not None:
            keep_base_meta(e, base.entries.get(path))
        if e.kind == FILE:
            if st.st_nlink > 1:
                e.link = groups.setdefault((st.st_dev, st.st_ino), len(groups) + 1)
            old = reuse(e, st) if reuse else None
            if old is not None and old.kind == FILE and old.size == e.size:
                # Untouched since it was restored, so the entry still describes it, including
                # owners and special bits a restore without trust_owners left off the disk.
                e.chunks, e.mode, e.uid, e.gid = old.chunks, old.mode, old.uid, old.gid
            else:
                todo.append(e)
        m.entries[path] = e


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_mode, st.st_ino, st.st_ctime_ns, st.st_size


def save_manifest(store: ObjectStore, m: Manifest) -> Digest:
    """Store the manifest, flush every pending pack, and return the snapshot id."""
    data = m.encode()
    d = Digest.of(data)
    if not store.has(d):
        store.put_envelope(d, codec.encode(data, _MANIFEST_LEVEL))
    store.flush()
    return d


def snapshot_tree(store: ObjectStore, root: str,
                  reuse: Reuse | None = None) -> tuple[Digest, Manifest]:
    """Scan, store and save ``root`` in one go."""
    tree = Tree.at(root)
    scan = scan_tree(tree, reuse)
    fill_content(store, tree, scan.todo)
    return save_manifest(store, scan.manifest), scan.manifest


def load_manifest(store: ObjectStore, snapshot: Digest) -> Manifest:
    """Read and validate a snapshot's manifest."""
    return Manifest.decode(store.get(snapshot), f"snapshot {snapshot}")
