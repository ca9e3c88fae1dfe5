"""Building a snapshot: chunk and store file content in parallel, then store the manifest.

Big jobs run in forked workers (``stickyci.forked``). Each inherits the store's index, so it
skips objects stored before the commit, and writes its own packs; the parent then reloads the
index.
Content is read through ``fsutil.Opener``: every path is resolved from the tree's root one
component at a time without following symlinks, in the parent and in each worker alike.
"""

from __future__ import annotations

import gc
import heapq
import mmap
import os
import zlib
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from .. import chunking, codec
from ..digest import Digest
from ..errors import IntegrityError, NotFound
from ..forked import PARALLEL_MIN_BYTES, ForkedPool, aborted
from ..fsutil import Opener, Tree
from ..store import ObjectStore
from .model import FILE, ChunkRef, Entry, Manifest, paused_gc
from .restore import Content
from .scan import is_special, keep_base_meta, skip_special, to_entry

# Reading small files whole is cheaper than mapping them; big ones are mapped to bound memory.
_MMAP_MIN = 8 << 20
SMALL_FILE = 64 << 10
"""Files up to this size are stored in bundles: concatenated in the order they are read,
several to an object. One by one they compress badly and each costs a call: the 1 GB
benchmark tree's 31k files under 64 KiB take 115 MiB at zstd -3 one by one, 64 MiB at -1 in
bundles."""
BUNDLE_MIN, BUNDLE_MAX, BOUNDARY = 256 << 10, 1 << 20, 16
"""A bundle ends at the first file past ``BUNDLE_MIN`` bytes whose path hashes to a multiple of
``BOUNDARY``, or at ``BUNDLE_MAX``: by name, so that a file added or removed moves no other
bundle's edges, and the same files give the same bundles (deduplicated) in any tree."""
CONTENT_LEVEL = 1
"""zstd level of file content. With small files bundled, -1 stores less than -3 did one by
one, and the commit's workers use 30% less CPU (the 1 GB benchmark tree's store: 387 MB
against 421 MB, docs/benchmarks.md)."""
_BATCH_BYTES = 32 << 20
# A manifest is mostly hex digests: zstd -1 packs it as small as -3 does, 2.4x faster (the
# 6.4 MB manifest of the 1 GB benchmark tree: 1.90 MB in 11 ms, against 1.96 MB in 27 ms).
_MANIFEST_LEVEL = 1
_ROOT = os.geteuid() == 0

Reuse = Callable[[Entry, os.stat_result], Entry | None]


def store_files(store: ObjectStore, opener: Opener, paths: Iterable[str],
                stop: Callable[[], bool] | None = None,
                base: Manifest | None = None) -> list[tuple[int, list[ChunkRef]]] | None:
    """Chunk the files at ``paths`` below the opener's tree into the store, small ones in
    bundles; return each one's size and chunk list, in order (None if ``stop()`` turned true
    before the last one).

    A small file whose bytes are those of its path in ``base`` keeps its chunk list: in a
    bundle, it would be stored again (a file copied up or rewritten unchanged is common).
    """
    out: list[tuple[int, list[ChunkRef]]] = []
    bundle = _Bundle(store, out)
    before = Content(store, whole_pack=False) if base is not None else None
    for path in paths:
        if stop is not None and stop():
            return None
        fd = opener.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                out.append((0, []))
                continue
            if size < _MMAP_MIN:
                data = os.read(fd, size + 1)
                if len(data) > size:  # the file grew since fstat
                    data += _read_rest(fd)
                if len(data) <= SMALL_FILE:
                    old = base.get(path) if base is not None else None
                    if old is not None and before is not None and _unchanged(before, old, data):
                        out.append((len(data), old.chunks))
                    else:
                        bundle.add(path, data)
                    continue
                view = memoryview(data)
                mapped = None
            else:
                mapped = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
                view = memoryview(mapped)
            try:
                out.append((len(view), [[store.put(piece, level=CONTENT_LEVEL).hex, len(piece)]
                                        for piece in chunking.cut(view)]))
            finally:
                view.release()
                if mapped is not None:
                    mapped.close()
        finally:
            os.close(fd)
    bundle.close()
    return out


def _unchanged(content: Content, e: Entry, data: bytes) -> bool:
    """True if ``data`` is the content of the file entry ``e`` (False where that cannot be
    read: the file is then stored anew)."""
    try:
        return (e.kind == FILE and e.size == len(data)
                and all(content.holds(ref, data, e.path) for ref in e.chunks))
    except (NotFound, IntegrityError):
        return False


class _Bundle:
    """Small files' content gathered into one object: each file's entry then names its slice
    (``[digest, length, offset]``); a file left alone in a bundle is an object of its own."""

    def __init__(self, store: ObjectStore, out: list[tuple[int, list[ChunkRef]]]) -> None:
        self.store = store
        self.out = out
        self.parts: list[bytes] = []
        self.slots: list[int] = []  # where each part's file is in ``out``
        self.size = 0

    def add(self, path: str, data: bytes) -> None:
        """Add the file ``path`` holding ``data``; its place in ``out`` is filled at
        :meth:`close`."""
        self.slots.append(len(self.out))
        self.out.append((len(data), []))
        self.parts.append(data)
        self.size += len(data)
        if self.size >= BUNDLE_MAX or (
                self.size >= BUNDLE_MIN and zlib.crc32(os.fsencode(path)) % BOUNDARY == 0):
            self.close()

    def close(self) -> None:
        """Store the bundle and fill in its files' chunk lists."""
        if len(self.parts) == 1:
            data = self.parts[0]
            self.out[self.slots[0]] = (len(data), [[self.store.put(
                data, level=CONTENT_LEVEL).hex, len(data)]])
        elif self.parts:
            hexd = self.store.put(b"".join(self.parts), level=CONTENT_LEVEL).hex
            offset = 0
            for slot, data in zip(self.slots, self.parts, strict=True):
                self.out[slot] = (len(data), [[hexd, len(data), offset]])
                offset += len(data)
        self.parts, self.slots, self.size = [], [], 0


def _read_rest(fd: int) -> bytes:
    parts = []
    while block := os.read(fd, 1 << 20):
        parts.append(block)
    return b"".join(parts)


def fill_content(store: ObjectStore, root: Tree | str, entries: Iterable[Entry]) -> None:
    """Store the content of ``entries`` (files under ``root``), hardlinked content once."""
    with ContentFill(store) as fill:
        fill.read_from(root if isinstance(root, Tree) else Tree.at(root))
        for e in entries:
            fill.add(e)
        fill.finish()


Packs = list[tuple[str, bytes]]  # a pack a forked worker wrote, and its index as stored
Done = tuple[int, list[tuple[int, list[ChunkRef]]], int, int, Packs]  # what a batch returns


class ContentFill:
    """Stores the content of file entries as a scan hands them over, hardlinked content once.

    Until there is ``PARALLEL_MIN_BYTES`` of content beside the largest file (one worker
    reads a file, however big), the content is read here at :meth:`finish`: forked workers
    cost more than they save (the benchmark's incremental change, a 50 MiB file and 13 MB of
    small ones: 0.27 s read here, 0.28-0.42 s forked). Past it, forked workers start on runs
    of neighbouring files while the scan goes on, so the walk overlaps the compression (a
    full commit of the 1 GB benchmark tree, 4 alternated runs: 2.65-3.20 s with the walk
    first, 2.51-2.62 s overlapped). Work waits here rather than in
    the pool's queue, so that a worker that frees up takes the largest task known by then:
    the longest-processing-time rule, as far as the scan has got. A big task handed out last
    would leave one worker compressing it while the others have nothing left to do; small
    runs last even the workers out.

    Use it as a context manager: leaving it on an error stops the workers cleanly.
    """

    def __init__(self, store: ObjectStore, base: Manifest | None = None) -> None:
        self.store = store
        self.base = base  # what the files were: see ``store_files``
        self.tree: Tree | None = None
        self._leaders: dict[int, Entry] = {}
        self._followers: list[Entry] = []
        self._early: list[Entry] = []  # before the workers start
        self._early_bytes = 0
        self._early_largest = 0
        self._tasks = _Tasks(_BATCH_BYTES)
        self._pool: ForkedPool[tuple[int, list[str]], Done] | None = None

    def __enter__(self) -> ContentFill:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        pool, self._pool = self._pool, None
        try:
            if pool is not None:
                pool.__exit__(kind, exc, tb)
                gc.unfreeze()
        finally:
            if exc is not None:
                # A worker of this process that fails may end next (os._exit): no pack
                # write cut off.
                self.store.settle()

    def read_from(self, tree: Tree) -> None:
        """Read the files handed over from below ``tree``."""
        self.tree = tree

    def add(self, e: Entry) -> None:
        """Store the content of the file entry ``e``, now or by :meth:`finish`."""
        if e.link and e.link in self._leaders:
            self._followers.append(e)
            return
        if e.link:
            self._leaders[e.link] = e
        if self._pool is None:
            self._early.append(e)
            self._early_bytes += e.size
            self._early_largest = max(self._early_largest, e.size)
            if self._early_bytes - self._early_largest >= PARALLEL_MIN_BYTES:
                self._start()
        else:
            self._queue(e)

    def finish(self) -> None:
        """Store everything handed over and not stored yet; wait for the workers."""
        if self._pool is None:
            assert self.tree is not None
            with Opener(self.tree) as opener:
                done = store_files(self.store, opener, [e.path for e in self._early],
                                   base=self.base)
            assert done is not None
            for e, (size, chunks) in zip(self._early, done, strict=True):
                e.size, e.chunks = size, chunks
            self._early = []
        else:
            self._tasks.close()
            pool = self._pool
            while pool.running or self._tasks.waiting:
                self._hand_out()
                self._apply(pool.next())
            self.__exit__(None, None, None)
            self.store.refresh()
        for e in self._followers:
            leader = self._leaders[e.link]
            e.size, e.chunks = leader.size, leader.chunks

    def _start(self) -> None:
        store, tree, base = self.store, self.tree, self.base
        assert tree is not None
        store.flush()

        def work(task: tuple[int, list[str]]) -> Done:
            i, paths = task
            before = store.bytes_written, store.objects_written
            known = set(store.written)
            # Failing or aborted, this worker may end next (os._exit): no pack write cut off.
            try:
                with Opener(tree) as opener:
                    out = store_files(store, opener, paths, aborted, base)
                if out is None:  # another batch failed: publish nothing more
                    store.settle()
                    return i, [], 0, 0, []
            except BaseException:
                store.settle()
                raise
            store.flush()  # each batch ends in a published pack: the parent sees only those
            packs = [(p, index) for p, index in store.written.items() if p not in known]
            return (i, out, store.bytes_written - before[0], store.objects_written - before[1],
                    packs)

        # What exists now (the entries scanned so far above all) is left out of every
        # collection, in the workers and here: a worker's collector would otherwise walk, and
        # so copy, each page it inherited, and this process's would walk them again as the
        # batches' results come in (the 1 GB benchmark tree: collections here 0.19 s, frozen
        # 0.05 s; 1.3 GB of a Rust toolchain: 0.42 s, 0.15 s).
        gc.freeze()
        try:
            self._pool = ForkedPool(work)
        except BaseException:
            gc.unfreeze()
            raise
        early, self._early = self._early, []
        for e in early:
            self._queue(e)

    def _queue(self, e: Entry) -> None:
        if not self._tasks.add(e):
            return
        assert self._pool is not None
        for done in self._pool.finished():
            self._apply(done)
        self._hand_out()

    def _hand_out(self) -> None:
        pool = self._pool
        assert pool is not None
        # One task more than workers, so that none waits for this process to hand it one.
        while self._tasks.waiting and pool.running <= pool.workers:
            i = self._tasks.take()
            pool.submit((i, [e.path for e in self._tasks.batches[i]]))

    def _apply(self, done: Done) -> None:
        i, out, nbytes, nobjects, packs = done
        for e, (size, chunks) in zip(self._tasks.batches[i], out, strict=True):
            e.size, e.chunks = size, chunks
        self.store.bytes_written += nbytes
        self.store.objects_written += nobjects
        # The worker's packs are indexed from what it sent back, not re-read from the store.
        for pack, index in packs:
            self.store.adopt(pack.removeprefix("packs/"), index)


class _Tasks:
    """Files grouped into tasks for the workers: runs of neighbouring files of about ``limit``
    bytes each, so each task is worth its overhead; a file of ``limit`` or more is a task of
    its own (in the run it joined, one worker would read all of it: an incremental commit of
    a rebuilt 50 MiB binary and 332 small files ran on one worker, the other idle). Tasks wait
    to be taken largest first."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.batches: list[list[Entry]] = []  # every task, by number
        self._run: list[Entry] = []
        self._run_cost = 0
        self._waiting: list[tuple[int, int]] = []  # a heap of (-cost, task number)

    @property
    def waiting(self) -> bool:
        """True if a task waits to be taken."""
        return bool(self._waiting)

    def add(self, e: Entry) -> bool:
        """Add a file; True if that made a task."""
        cost = e.size + 4096  # a file's own overhead (open, stat, a row) counts too
        if cost >= self.limit:
            self._task([e], cost)
            return True
        self._run.append(e)
        self._run_cost += cost
        if self._run_cost < self.limit:
            return False
        self.close()
        return True

    def close(self) -> None:
        """Make the run in progress a task, short as it may be."""
        if self._run:
            self._task(self._run, self._run_cost)
            self._run, self._run_cost = [], 0

    def take(self) -> int:
        """The number of the largest task waiting, now no longer waiting."""
        return heapq.heappop(self._waiting)[1]

    def _task(self, batch: list[Entry], cost: int) -> None:
        heapq.heappush(self._waiting, (-cost, len(self.batches)))
        self.batches.append(batch)


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
    fill: ContentFill | None = None  # stores the content of ``todo`` as the scan goes

    def read_later(self, e: Entry) -> None:
        """Add the file entry ``e`` to ``todo``, and hand it to the fill, if any, which may
        start storing it now."""
        self.todo.append(e)
        if self.fill is not None:
            self.fill.add(e)

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


def scan_tree(root: Tree | str, reuse: Reuse | None = None, base: Manifest | None = None,
              fill: ContentFill | None = None) -> Scan:
    """Describe ``root``; ``reuse`` may return a previous entry for a file it knows is unchanged,
    whose chunks and metadata are then kept instead of read again. Directories and symlinks
    keep the metadata of their entry in ``base`` where the disk shows only what a restore of
    it wrote (``keep_base_meta``). ``fill``, if given, is handed the files to read as they
    are found.
    """
    tree = root if isinstance(root, Tree) else Tree.at(root)
    out = Scan(fill=fill)
    if fill is not None:
        fill.read_from(tree)
    with paused_gc():  # an entry per path: tens of thousands of objects, none of them cyclic
        _scan_into(out, tree, reuse, base)
    return out


def _scan_into(out: Scan, tree: Tree, reuse: Reuse | None, base: Manifest | None) -> None:
    entries, known = out.manifest.entries, base.entries if base is not None else None
    groups: dict[tuple[int, int], int] = {}
    for found in tree.walk():
        path, st = found.path, found.stat
        out.saw(path, st)
        if is_special(st):
            skip_special(path, st)
            out.skipped += 1
            continue
        e = to_entry(found)
        if known is not None:
            keep_base_meta(e, known.get(path))
        if e.kind == FILE:
            if st.st_nlink > 1:
                e.link = groups.setdefault((st.st_dev, st.st_ino), len(groups) + 1)
            old = reuse(e, st) if reuse else None
            if old is not None and old.kind == FILE and old.size == e.size:
                # Untouched since it was restored, so the entry still describes it, including
                # owners and special bits a restore without trust_owners left off the disk.
                e.chunks, e.mode, e.uid, e.gid = old.chunks, old.mode, old.uid, old.gid
            else:
                out.read_later(e)
        entries[path] = e


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_mode, st.st_ino, st.st_ctime_ns, st.st_size


def save_manifest(store: ObjectStore, m: Manifest, base: Manifest | None = None,
                  touched: Collection[str] | None = None) -> Digest:
    """Store the manifest, flush every pending pack, and return the snapshot id.

    ``m`` differs from ``base`` only at ``touched`` paths, when both are given (an overlay
    commit's scan): its encoding is then spliced into ``base``'s (``Manifest.encode_after``).
    """
    data = m.encode() if base is None or touched is None else m.encode_after(base, touched)
    d = Digest.of(data)
    if not store.has(d):
        store.put_envelope(d, codec.encode(data, _MANIFEST_LEVEL))
    store.flush()
    return d


def snapshot_tree(store: ObjectStore, root: str,
                  reuse: Reuse | None = None) -> tuple[Digest, Manifest]:
    """Scan, store and save ``root`` in one go."""
    with ContentFill(store) as fill:
        scan = scan_tree(root, reuse, fill=fill)
        fill.finish()
    return save_manifest(store, scan.manifest), scan.manifest


def load_manifest(store: ObjectStore, snapshot: Digest, *, lazy: bool = False) -> Manifest:
    """Read a snapshot's manifest (``lazy``: see ``Manifest.decode``)."""
    return Manifest.decode(store.get(snapshot), f"snapshot {snapshot}", lazy=lazy)
