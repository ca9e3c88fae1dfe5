"""Content-addressed objects, grouped into pack files so a tree of 50k files is a few dozen writes.

A pack ``packs/<id>`` is a run of object envelopes; its index ``index/<id>`` lists, for each
object, its digest, offset and length, and ends with the BLAKE3 of the listing. A server may
answer a reader with a *partial* index (magic ``SCXP``): the entries that reader may see, a view
that grows as refs change, never the stored blob. A pack is
written before its index, so an object is visible only once its bytes are durable; a pack
without an index (a writer killed mid-commit) is garbage for ``gc``.
"""

from __future__ import annotations

import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import zstandard

from .. import codec
from ..digest import Digest
from ..errors import IntegrityError, NotFound
from .backend import Backend
from .localindex import Damaged, LocalIndex, View

PACK_TARGET = 16 << 20
INDEX_MAGIC = b"SCX1"
PARTIAL_MAGIC = b"SCXP"
MAX_OBJECT = 1 << 30
"""The largest object an upload is verified against (a chunk is at most 1 MiB; a manifest of
a huge tree is the big one)."""
_ENTRY = struct.Struct("<32sQI")
FETCH_THREADS = 8
"""Indexes read at once when a refresh finds many new ones (they are small; the wait is the
round trip)."""


class IndexEntry(NamedTuple):
    """One object of a pack: its digest and where its envelope lies."""

    digest: Digest
    offset: int
    length: int


class Location(NamedTuple):
    """Where an object's envelope lives (a tuple: gc makes one per indexed object)."""

    pack: str
    offset: int
    length: int


def encode_index(entries: Iterable[IndexEntry], *, partial: bool = False) -> bytes:
    """Serialise a pack index: magic, entries, then the BLAKE3 of everything before it.

    ``partial`` marks a view of an index (some of its entries), which no reader may keep as
    the stored index.
    """
    magic = PARTIAL_MAGIC if partial else INDEX_MAGIC
    body = magic + b"".join(_ENTRY.pack(d.raw, off, ln) for d, off, ln in entries)
    return body + Digest.of(body).raw


def decode_index(name: str, data: bytes) -> list[IndexEntry]:
    """Parse a pack index (stored or partial), raising ``IntegrityError`` if it was damaged."""
    return [IndexEntry(Digest(d), off, ln) for d, off, ln in _decode_index_raw(name, data)]


def index_is_partial(data: bytes) -> bool:
    """Whether an index is a reader's partial view rather than the stored blob."""
    return data.startswith(PARTIAL_MAGIC)


def read_at(backend: Backend, loc: Location, digest: Digest) -> bytes:
    """Read the object ``digest`` where ``loc`` says it lies, verified: ``IntegrityError`` when
    the bytes there are not that object, ``NotFound`` when the pack is gone."""
    return codec.decode(backend.get(loc.pack, loc.offset, loc.length), digest)


def _decode_index_raw(name: str, data: bytes) -> Iterator[tuple[bytes, int, int]]:
    # Raw digests, not ``IndexEntry``: building a Digest per entry would slow down loading
    # every index of a store, which is on the path of every commit.
    body, check = data[:-32], data[-32:]
    if (not body.startswith((INDEX_MAGIC, PARTIAL_MAGIC))
            or Digest.of(body).raw != check or (len(body) - 4) % _ENTRY.size):
        raise IntegrityError(f"pack index {name} is corrupt; restore it from a backup")
    return _ENTRY.iter_unpack(body[len(INDEX_MAGIC) :])


def verify_index(name: str, pack: bytes | memoryview, entries: Sequence[IndexEntry]) -> None:
    """Raise ``IntegrityError`` unless ``entries`` describe ``pack`` exactly: together they
    cover every byte of it without overlap, and each envelope decodes to its digest.

    Exact coverage makes the index of a pack unique, so nobody can publish one that hides
    objects of a pack from gc (which would then sweep them) or claims objects it lacks.
    """
    view = memoryview(pack)
    end = 0
    for e in sorted(entries, key=lambda e: e.offset):
        if e.offset != end or e.length <= 0:
            what = "overlaps the previous entry" if e.offset < end else "leaves a gap before it"
            raise IntegrityError(f"{name}: the entry for {e.digest} at {e.offset} {what}; "
                                 "an index must describe every byte of its pack once")
        end = e.offset + e.length
        if end > len(view):
            raise IntegrityError(f"{name}: the entry for {e.digest} ends past its pack's "
                                 f"{len(view)} bytes; nothing stored")
        try:
            _check_declared_size(view[e.offset : end], e.digest)
            codec.decode(view[e.offset : end], e.digest)
        except IntegrityError as exc:
            raise IntegrityError(f"{name}: {exc}; the index does not describe its pack") \
                from exc
    if end != len(view):
        raise IntegrityError(f"{name}: the entries cover {end} of the pack's {len(view)} bytes; "
                             "an index must describe every byte of its pack")


def _check_declared_size(envelope: memoryview, digest: Digest) -> None:
    # zstd allocates the size a frame declares: an upload must not make the server do that.
    if bytes(envelope[3:5]) == bytes((codec.VERSION, codec.ZSTD)):
        try:
            size = zstandard.frame_content_size(envelope[codec.HEADER_SIZE :])
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"object {digest} is corrupt: {exc}") from exc
        if size < 0 or size > MAX_OBJECT:
            raise IntegrityError(f"object {digest} declares {size} bytes of content; objects "
                                 f"hold at most {MAX_OBJECT}")


class ObjectStore:
    """Objects by digest over a backend. Thread-safe, so one store can serve many requests."""

    def __init__(self, backend: Backend, *, load_index: bool = True,
                 local_index: bool = True, listing: bool = True) -> None:
        """``load_index=False`` defers reading the pack indexes to the first ``get`` miss.
        ``local_index=False`` reads every index from the store, keeping none locally (for a
        store that must see exactly what it wrote, as repacking does). ``listing=False``
        takes the local index as the index without listing the store (unless it is empty):
        for a commit, whose ``check_present`` finds any pack a gc swept since (and forgets
        it, so storing those objects again works); what others stored since the runner last
        listed is not deduplicated against."""
        self.backend = backend
        self._local = LocalIndex.for_backend(backend) if local_index else None
        # The local index as opened, searched in place. Until it is checked against a
        # listing (or taken as the index by a commit, ``_trusted``) its places are only
        # places to read and verify, never proof that an object is stored.
        self._view: View | None = None
        self._opened = False
        self._trusted = False
        self._synced = False
        self._viewed: set[str] = set()  # index names the view holds, once checked
        self._pid = os.getpid()
        # What this process read from the store or wrote itself, keyed by raw digest bytes
        # (hashing bytes is much cheaper than hashing a Digest); the values are a Location's
        # fields as a plain tuple for the same reason (``locate`` makes the Location).
        self._index: dict[bytes, tuple[str, int, int]] = {}
        self._read: set[str] = set()  # index names whose entries ``_index`` holds
        # Packs this process wrote (or adopted from its forked workers), newest last, with
        # their index as stored: young enough that no gc can have swept them, already indexed.
        self.written: dict[str, bytes] = {}
        self._lock = threading.Lock()
        # The envelopes of the pack being filled, in pack order, joined once when it is
        # written (a growing buffer would copy a 16 MiB pack several times).
        self._pending: dict[Digest, bytes] = {}
        self._pending_size = 0
        self._publishing: dict[Digest, memoryview] = {}
        # The full pack being written on a thread while the next one fills, and what its
        # write raised (see ``_write_behind``).
        self._writer: tuple[threading.Thread, list[BaseException]] | None = None
        self._writer_lock = threading.Lock()
        self._spans: OrderedDict[str, bytes] = OrderedDict()
        self._span_locks: dict[str, threading.Lock] = {}
        self._hints: list[str] = []
        self.bytes_written = 0
        self.objects_written = 0
        if load_index and not listing and self._local is not None:
            self._open_view()
            if self._view is not None and not self._view.empty:
                self._trusted = True
                return
        if load_index:  # a runner new to the store lists it once, to deduplicate
            self.refresh()

    def _open_view(self) -> None:
        """Open the local index, once."""
        if not self._opened and self._local is not None:
            self._opened = True
            self._view = self._local.open()

    def _held(self, raw: bytes) -> tuple[str, int, int] | None:
        """Where the local index places an object, if it does."""
        view = self._view
        if view is None:
            return None
        try:
            return view.find(raw)
        except Damaged as exc:
            self._lose_view(view, exc)
            return None

    def _lose_view(self, view: View, damage: Damaged) -> None:
        """The local index is damaged: remove it and read what it held from the store
        again on the next refresh (which rebuilds it)."""
        if self._local is not None:
            self._local.discard(view.ino, damage)
        with self._lock:
            if self._view is view:
                self._view, self._viewed = None, set()

    def refresh(self) -> None:
        """Load the indexes of packs written since the last refresh (by anyone), and forget
        the packs gone since (gc swept them). With a local index (:mod:`.localindex`) only
        those are read: one listing, then a read per new pack."""
        listed = self.backend.list("index")
        if self._local is not None:
            self._sync_local(listed)
        with self._lock:
            have = self._read | self._viewed
        self._load([n for n in listed if n not in have])

    def _load(self, names: list[str]) -> None:
        """Read the indexes ``names`` into this process's index, and the local index."""
        stored = []
        for name, data in self._fetch(names):
            pack_id = name.split("/", 1)[1]
            pack = "packs/" + pack_id
            entries = list(_decode_index_raw(name, data))
            with self._lock:
                index = self._index
                for d, off, ln in entries:
                    if d not in index:
                        index[d] = (pack, off, ln)
                # A partial view grows when refs this reader may read change: re-read it on
                # the next miss instead of taking it for the whole index (nor keeping it).
                if not index_is_partial(data):
                    self._read.add(name)
                    stored.append((pack_id, entries))
        if self._local is not None and stored:
            self._local.add(stored, merge_large=True)

    def _fetch(self, names: list[str]) -> list[tuple[str, bytes]]:
        """The indexes ``names``, read in parallel when there are many (a new runner's
        first look at a remote store); one gone since the listing is left out."""
        def one(name: str) -> tuple[str, bytes | None]:
            try:
                return name, self.backend.get(name)
            except NotFound:
                return name, None

        if len(names) > FETCH_THREADS:
            with ThreadPoolExecutor(FETCH_THREADS) as pool:
                got = list(pool.map(one, names))
        else:
            got = [one(n) for n in names]
        return [(n, d) for n, d in got if d is not None]

    def _sync_local(self, listed: list[str]) -> None:
        """Check the local index against a listing (first time: open it, take what it holds
        that the store still lists) and forget what the store no longer lists, there and
        here: entries of a swept pack must not pass for stored objects."""
        present = set(listed)
        if not self._synced:
            self._synced = True
            self._open_view()
            view = self._view
            if view is not None:
                try:
                    names = view.names()
                except Damaged as exc:
                    self._lose_view(view, exc)
                else:
                    with self._lock:
                        self._viewed = names
                    self._trusted = True
        own = {"index/" + p.split("/", 1)[1] for p in self.written}
        with self._lock:
            gone = [n for n in self._read | self._viewed if n not in present and n not in own]
        if gone:
            self._distrust(["packs/" + n.split("/", 1)[1] for n in gone])

    def _distrust(self, packs: Sequence[str]) -> None:
        """Places in ``packs`` did not hold their objects (or the packs are gone): read their
        indexes from the store again on the next refresh, not from the local index."""
        ids = [p.split("/", 1)[1] for p in packs]
        if self._local is not None:
            self._local.forget(ids)
        if self._view is not None:
            self._view.exclude(packs)
        dropped = set(packs)
        with self._lock:
            for pack_id in ids:
                self._read.discard(f"index/{pack_id}")
                self._viewed.discard(f"index/{pack_id}")
            self._index = {d: loc for d, loc in self._index.items() if loc[0] not in dropped}

    def has(self, digest: Digest) -> bool:
        """True if the object is stored or on its way into a pack."""
        raw = digest.raw
        return (raw in self._index or (self._trusted and self._held(raw) is not None)
                or digest in self._pending or digest in self._publishing)

    def locate(self, digest: Digest) -> Location | None:
        """The pack location of a stored object."""
        loc = self._index.get(digest.raw) or self._held(digest.raw)
        return Location(*loc) if loc else None

    def check_present(self, digests: Iterable[bytes]) -> set[str]:
        """Raise unless every object (raw digest) is in a pack that still exists; return
        those packs (``packs/<id>``).

        A gc may have swept a pack holding an old object this commit deduplicated against.
        """
        packs = set()
        for d in digests:
            loc = self._index.get(d) or (self._held(d) if self._trusted else None)
            if loc is None:
                raise NotFound(f"object {Digest(d)} is missing from the store")
            packs.add(loc[0])
        gone = self.backend.missing(sorted(packs - self.written.keys()))
        if gone:
            self._distrust(gone)  # so a refresh and a retry store those objects again
            raise NotFound(f"{gone[0]} was removed by a concurrent gc; retry the commit")
        return packs

    def packs_of(self, digests: Iterable[bytes]) -> set[str] | None:
        """The packs (``packs/<id>``) this process would read objects ``digests`` from, or
        None when one of them is in none it knows of."""
        packs = set()
        for d in digests:
            loc = self._index.get(d) or self._held(d)
            if loc is None:
                return None
            packs.add(loc[0])
        return packs

    def hint(self, packs: Iterable[Digest]) -> None:
        """Packs likely to hold what is read next: on a miss their indexes are read before
        any listing of the store, so a runner new to it reads a snapshot's indexes and not
        the store's. Whatever they say is read and verified as usual."""
        with self._lock:
            self._hints = [f"index/{p.hex}" for p in packs]

    def _take_hints(self) -> bool:
        """Read the hinted packs' indexes, once; whether there were any."""
        with self._lock:
            names, self._hints = [n for n in self._hints if n not in self._read], []
        if names:
            self._load(names)
        return bool(names)

    def put(self, plain: bytes | memoryview, digest: Digest | None = None, *,
            level: int = codec.LEVEL) -> Digest:
        """Store ``plain`` (compressed at zstd ``level``) unless an object with its digest
        exists; return the digest."""
        d = digest or Digest.of(plain)
        if self.has(d):
            return d
        self.put_envelope(d, codec.encode(plain, level))
        return d

    def put_envelope(self, digest: Digest, envelope: bytes) -> None:
        """Append an already encoded object to the current pack."""
        flush = None
        with self._lock:
            if self.has(digest):
                return
            self._pending[digest] = envelope
            self._pending_size += len(envelope)
            self.bytes_written += len(envelope)
            self.objects_written += 1
            if self._pending_size >= PACK_TARGET:
                flush = self._take_pack()
        if flush:
            self._write_behind(*flush)

    def flush(self) -> None:
        """Write the pack being filled, if any. Objects are durable once this returns."""
        with self._writer_lock:
            self._written()  # raising, it leaves the pack being filled to the next flush
            with self._lock:
                taken = self._take_pack() if self._pending else None
            if taken:
                self._write_pack(*taken)

    def _write_behind(self, data: bytes, entries: dict[Digest, tuple[int, int]]) -> None:
        """Write a full pack on a thread of its own while the caller fills the next one:
        the write (an fsync of 16 MiB) overlaps the next pack's compression instead of
        following it. One pack in flight at most, so memory stays at two packs; what the
        write raised, the next pack or ``flush`` raises."""
        with self._writer_lock:
            try:
                self._written()
            except BaseException:
                self._unpublish(entries)
                raise
            failed: list[BaseException] = []

            def write() -> None:
                try:
                    self._write_pack(data, entries)
                except BaseException as exc:  # handed to the caller's thread, raised there
                    failed.append(exc)

            thread = threading.Thread(target=write, name="stickyci-pack-writer", daemon=True)
            thread.start()
            self._writer = thread, failed

    def settle(self) -> None:
        """Wait for the pack being written behind, if any, and drop what its write raised.

        For a caller that is failing already, before its process ends: a forked worker ends
        with ``os._exit``, which stops a thread halfway through its write and leaves a temp
        file in the store. A failed write has unpublished its objects; the caller's own error
        is the one to report."""
        with self._writer_lock:
            self._join()

    def _written(self) -> None:
        """Wait for the pack in flight, if any; raise what its write raised."""
        failed = self._join()
        if failed:
            raise failed[0]

    def _join(self) -> list[BaseException]:
        writer, self._writer = self._writer, None
        if writer is None:
            return []
        writer[0].join()
        return writer[1]

    def _take_pack(self) -> tuple[bytes, dict[Digest, tuple[int, int]]]:
        envelopes, self._pending, self._pending_size = self._pending, {}, 0
        data = b"".join(envelopes.values())
        # Keep the pack readable in memory until it is published, so a reader never misses it.
        view = memoryview(data)
        entries, off = {}, 0
        for d, envelope in envelopes.items():
            entries[d] = (off, len(envelope))
            self._publishing[d] = view[off : off + len(envelope)]
            off += len(envelope)
        return data, entries

    def _write_pack(self, data: bytes, entries: dict[Digest, tuple[int, int]]) -> None:
        pack_id = Digest.of(data).hex
        try:
            # Sorted by the raw bytes: comparing Digest objects costs a Python call each.
            index = encode_index(IndexEntry(d, off, ln) for d, (off, ln)
                                 in sorted(entries.items(), key=lambda kv: kv[0].raw))
            self.backend.put(f"packs/{pack_id}", data)
            self.backend.put(f"index/{pack_id}", index)
        except BaseException:
            self._unpublish(entries)
            raise
        self._unpublish(entries)
        self.adopt(pack_id, index)

    def _unpublish(self, entries: Iterable[Digest]) -> None:
        """Stop serving a pack's objects from memory: written, or failed."""
        with self._lock:
            for d in entries:
                self._publishing.pop(d, None)

    def adopt(self, pack_id: str, index: bytes) -> None:
        """Index a pack this process or one of its forked workers wrote, from the index it
        stored (:func:`encode_index`), without reading that back from the backend.

        A worker hands its packs over as their encoded indexes: one bytes object per pack
        crosses the process boundary, not a Python object per entry.
        """
        pack, name = f"packs/{pack_id}", f"index/{pack_id}"
        entries = _decode_index_raw(name, index)
        rows = list(entries)
        with self._lock:
            for d, off, ln in rows:
                self._index.setdefault(d, (pack, off, ln))
            self._read.add(name)
            self.written[pack] = index
        # Forked workers' packs are recorded once, by the process that adopts them.
        if self._local is not None and os.getpid() == self._pid:
            self._local.add([(pack_id, rows)])

    def get(self, digest: Digest, *, whole_pack: bool = False) -> bytes:
        """Read and verify an object. ``whole_pack`` caches its pack for sequential readers."""
        try:
            return codec.decode(self._envelope(digest, whole_pack), digest)
        except (IntegrityError, NotFound):
            loc = self.locate(digest)
            if loc is None or self._local is None or loc.pack in self.written:
                raise
        # The place came from the local index, and may be wrong or swept by gc since: read
        # the pack's own index again, or find where the object lies now, once.
        self._distrust([loc.pack])
        with self._lock:
            self._spans.pop(loc.pack, None)
        self.refresh()
        return codec.decode(self._envelope(digest, whole_pack), digest)

    def _envelope(self, digest: Digest, whole_pack: bool) -> bytes | memoryview:
        loc = self.locate(digest)
        if loc is None and not self._opened:
            # A reader's first miss: the local index, without a listing. Its places are
            # checked by reading them (see ``get``); ``has`` never answers from it.
            self._open_view()
            loc = self.locate(digest)
        if loc is None and self._take_hints():
            loc = self.locate(digest)
        if loc is None:
            # Another writer may have published it since the index was (or was not) loaded.
            self.refresh()
            loc = self.locate(digest)
        if loc is None:
            with self._lock:
                if digest in self._publishing:
                    return self._publishing[digest]
                if digest in self._pending:
                    return self._pending[digest]
            raise NotFound(f"object {digest} is missing from the store")
        if not whole_pack:
            data = self.backend.get(loc.pack, loc.offset, loc.length)
        else:
            data = self._span(loc.pack)
            return memoryview(data)[loc.offset : loc.offset + loc.length]
        if len(data) != loc.length:
            raise IntegrityError(f"object {digest} is truncated in {loc.pack}")
        return data

    def _span(self, pack: str) -> bytes:
        with self._lock:
            lock = self._span_locks.setdefault(pack, threading.Lock())
        with lock:
            with self._lock:
                cached = self._spans.get(pack)
                if cached is not None:
                    self._spans.move_to_end(pack)
                    return cached
            data = self.backend.get(pack)
            with self._lock:
                self._spans[pack] = data
                # A few packs cover a sequential reader; keep memory bounded.
                while len(self._spans) > 6:
                    self._spans.popitem(last=False)
            return data
