"""A runner's merged index of a store: every stored pack index it has read, in one local file.

Packs and their indexes are immutable and named by content, so an entry never goes stale while
its pack exists; what changes is which packs exist. ``ObjectStore.refresh`` lists the store's
indexes once, reads only those this file does not hold, and records those that are gone (gc
swept them), so its reads grow with what changed, not with the store.

The file is a *table* followed by a *tail*. The table is the compacted index: fixed-size rows
(digest, pack, offset, length) sorted by digest and cut into buckets by the digest's leading
bits, each bucket sealed by a checksum in a sealed header, then the ids of the live packs. A
lookup reads the header once and then one bucket (a few KB) the first time a digest falls in
it, never the whole table, so opening the file and looking a few objects up costs the same at
10 packs as at 10,000. The tail is a log of records appended under a lock since the table was
written: *add* (packs and their entries, as read from their stored indexes) and *forget* (packs
that are gone), each ending with the BLAKE3 of its bytes; opening the file reads it whole, and
once it holds a forget or grows past ``COMPACT_RECORDS`` records or ``COMPACT_ROWS`` entries,
table and tail are merged into a new table, written aside and renamed under the lock (a reader
keeps the file it opened, whose bytes never change).

It is a cache, so it is never trusted blindly: a header, bucket or record that does not verify
makes the whole file go (it is rebuilt from the store), a torn last record (a writer killed
mid-append) is cut off, and whatever an entry says is read back from its pack and verified by
digest. Only stored indexes go in, never a server's partial view, and there is one file per
store and credential (:func:`scope_of`), so one token's entries never show to another.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import itertools
import logging
import os
import struct
import uuid
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..digest import Digest
from ..paths import cache_home

log = logging.getLogger("stickyci")

# The tail's records.
_HEAD = struct.Struct("<4sBII")  # magic, kind, packs, entries
_LOG_ROW = struct.Struct("<32sIQI")  # digest, pack number within the record, offset, length
_MAGIC = b"SCXL"
_ADD, _FORGET = 1, 2
_CHECK = 32
# The table.
_TABLE = struct.Struct("<4sBBHII")  # magic, version, bucket bits, reserved, rows, packs
_TABLE_MAGIC = b"SCXT"
_VERSION = 1
_ROW = struct.Struct("<32s32sQI")  # digest, pack id, offset, length
_SUM = 16  # bytes of a bucket's (and the pack list's) truncated BLAKE3
_MAX_BITS = 24
COMPACT_RECORDS = 64
"""Merge the tail into the table once it holds more records than this..."""
COMPACT_ROWS = 4096
"""... or more entries than this (opening the file reads the tail whole)."""

Loc = tuple[str, int, int]  # "packs/<id>", offset, length


def scope_of(backend: object) -> str:
    """What names a backend's merged index: its ``cache_scope`` (the URL plus whatever else
    decides what it shows, such as a token) or, failing that, its URL."""
    return str(getattr(backend, "cache_scope", None) or getattr(backend, "url", ""))


class Damaged(Exception):
    """A header, bucket or record that does not verify: the file is not to be used."""


class _DamagedFile(Damaged):
    """``Damaged``, found on opening the file with inode ``ino``."""

    def __init__(self, ino: int, damage: Damaged) -> None:
        super().__init__(str(damage))
        self.ino = ino


def encode_add(packs: Sequence[tuple[str, Iterable[tuple[bytes, int, int]]]]) -> bytes:
    """An *add* record: each pack id (hex) with its entries (raw digest, offset, length)."""
    ids: list[bytes] = []
    rows: list[bytes] = []
    for number, (pack_id, entries) in enumerate(packs):
        ids.append(bytes.fromhex(pack_id))
        rows.extend(_LOG_ROW.pack(d, number, off, ln) for d, off, ln in entries)
    return _seal(_HEAD.pack(_MAGIC, _ADD, len(ids), len(rows)) + b"".join(ids) + b"".join(rows))


def encode_forget(pack_ids: Sequence[str]) -> bytes:
    """A *forget* record: packs that are gone from the store."""
    return _seal(_HEAD.pack(_MAGIC, _FORGET, len(pack_ids), 0)
                 + b"".join(bytes.fromhex(p) for p in pack_ids))


def _seal(body: bytes) -> bytes:
    return body + Digest.of(body).raw


def _sum(data: bytes | memoryview) -> bytes:
    return Digest.of(data).raw[:_SUM]


def encode_table(rows: list[bytes], packs: Iterable[bytes]) -> bytes:
    """A table of ``rows`` (``_ROW``-packed; sorted and deduplicated here) and the raw ids
    of the live ``packs``."""
    # Compaction passes the old table's rows (sorted) then the tail's: sorting two runs is a
    # merge, and dropping the duplicates of a sorted list keeps it sorted.
    rows.sort()
    ordered = list(dict.fromkeys(rows))
    ids = b"".join(sorted(set(packs)))
    bits = max(4, min(_MAX_BITS, (len(ordered) // 64).bit_length()))
    shift = 32 - bits
    ends = [bisect.bisect_left(ordered, ((b + 1) << shift).to_bytes(4, "big"))
            for b in range((1 << bits) - 1)] + [len(ordered)]
    body = b"".join(ordered)
    size = _ROW.size
    sums = b"".join(_sum(body[start * size : end * size])
                    for start, end in zip([0, *ends[:-1]], ends, strict=True))
    head = (_TABLE.pack(_TABLE_MAGIC, _VERSION, bits, 0, len(ordered), len(ids) // 32)
            + struct.pack(f"<{len(ends)}I", *ends) + sums + _sum(ids))
    return _seal(head) + body + ids


@dataclass(slots=True)
class _Tail:
    """The records after the table: live packs they add, packs they take away, entries."""

    added: set[bytes] = field(default_factory=set)
    gone: set[bytes] = field(default_factory=set)
    rows: list[tuple[bytes, bytes, int, int]] = field(default_factory=list)  # d, pack, off, len
    records: int = 0
    whole: int = 0  # bytes of whole records (a torn last record is left out)


def _read_tail(data: bytes) -> _Tail:
    """Parse the tail; ``Damaged`` if a record does not verify."""
    # The last record naming a pack decides: a forget drops it whatever came before, and a
    # pack added again after it was forgotten (gc swept it, then the same bytes were stored
    # again) is back.
    state: dict[bytes, bool] = {}
    adds: list[tuple[list[bytes], memoryview]] = []
    view, pos, records = memoryview(data), 0, 0
    while len(data) - pos >= _HEAD.size:
        magic, kind, packs, rows = _HEAD.unpack_from(data, pos)
        if magic != _MAGIC or kind not in (_ADD, _FORGET):
            raise Damaged(f"a record at byte {pos} of the tail has no valid header")
        end = pos + _HEAD.size + 32 * packs + _LOG_ROW.size * rows
        if end + _CHECK > len(data):
            break
        if Digest.of(view[pos:end]).raw != data[end : end + _CHECK]:
            raise Damaged(f"the record at byte {pos} of the tail does not match its checksum")
        ids_at = pos + _HEAD.size
        ids = [data[i : i + 32] for i in range(ids_at, ids_at + 32 * packs, 32)]
        for p in ids:
            state[p] = kind == _ADD
        if kind == _ADD:
            adds.append((ids, view[ids_at + 32 * packs : end]))
        records += 1
        pos = end + _CHECK
    out = _Tail(records=records, whole=pos)
    out.added = {p for p, live in state.items() if live}
    out.gone = {p for p, live in state.items() if not live}
    for ids, rows_view in adds:
        try:
            out.rows.extend((d, ids[n], off, ln) for d, n, off, ln
                            in _LOG_ROW.iter_unpack(rows_view) if ids[n] in out.added)
        except IndexError:
            raise Damaged("an entry names a pack its record does not list") from None
    return out


@dataclass(frozen=True, slots=True)
class _Table:
    """Where the table's parts lie in the file, from its verified header."""

    bits: int
    ends: tuple[int, ...]
    sums: bytes
    names_sum: bytes
    rows_at: int
    rows: int
    packs: int

    @property
    def size(self) -> int:
        return self.rows_at + _ROW.size * self.rows + 32 * self.packs


def _read_table(fd: int, size: int) -> _Table | None:
    """The table's header, verified; None when the file holds only a tail."""
    first = os.pread(fd, _TABLE.size, 0)
    if not first.startswith(_TABLE_MAGIC):
        return None
    if len(first) < _TABLE.size:
        raise Damaged("the table's header is cut short")
    _, version, bits, _, rows, packs = _TABLE.unpack(first)
    if version != _VERSION or not 0 < bits <= _MAX_BITS:
        raise Damaged(f"the table has version {version} and {bits} bucket bits")
    buckets = 1 << bits
    length = _TABLE.size + (4 + _SUM) * buckets + _SUM
    if length + _CHECK > size:
        raise Damaged(f"the table's header is cut short ({size} of {length + _CHECK} bytes)")
    head = os.pread(fd, length + _CHECK, 0)
    if len(head) != length + _CHECK or Digest.of(head[:length]).raw != head[length:]:
        raise Damaged("the table's header does not match its checksum")
    ends = struct.unpack_from(f"<{buckets}I", head, _TABLE.size)
    if ends[-1] != rows or any(a > b for a, b in itertools.pairwise(ends)):
        raise Damaged("the table's buckets do not add up")
    sums_at = _TABLE.size + 4 * buckets
    table = _Table(bits, ends, head[sums_at : sums_at + _SUM * buckets],
                   head[sums_at + _SUM * buckets : length], length + _CHECK, rows, packs)
    if table.size > size:
        raise Damaged(f"the table is cut short ({size} of {table.size} bytes)")
    return table


class View:
    """The file as one process opened it: lookups search its table in place (a bucket is
    read and verified the first time a digest falls in it), its tail is in memory. The
    bytes it reads never change: appends go past them, compaction writes a new file."""

    def __init__(self, fd: int | None, ino: int, table: _Table | None, tail: _Tail) -> None:
        self._fd = fd
        self.ino = ino
        self._table = table
        self._tail_rows = tail.rows
        self._added = tail.added
        self._skip = set(tail.gone)  # raw ids of packs whose rows no longer count
        self.records = tail.records
        self.tail_rows = len(tail.rows)
        self.torn = False
        self._shift = 32 - table.bits if table else 0
        self._buckets: dict[int, tuple[bytes, dict[bytes, int]]] = {}
        self._names: dict[bytes, str] = {}
        self._tail = self._tail_map()
        if fd is not None:
            weakref.finalize(self, os.close, fd)

    @property
    def rows(self) -> int:
        """Entries in the table."""
        return self._table.rows if self._table else 0

    @property
    def empty(self) -> bool:
        """Whether the file holds no live pack."""
        return not self._added and (self._table is None or self._table.packs == 0)

    @property
    def needs_compaction(self) -> bool:
        """Whether the tail is due to be merged into the table."""
        return (self.torn or bool(self._skip) or self.records > COMPACT_RECORDS
                or self.tail_rows > COMPACT_ROWS)

    def find(self, raw: bytes) -> Loc | None:
        """A place of the object with digest ``raw``, if the file holds one; ``Damaged``
        when the bucket it falls in does not verify."""
        loc = self._tail.get(raw)
        if loc is not None or self._table is None:
            return loc
        bucket = int.from_bytes(raw[:4], "big") >> self._shift
        got = self._buckets.get(bucket)
        if got is None:
            got = self._buckets[bucket] = self._bucket(bucket)
        data, rows = got
        at = rows.get(raw, -1)
        # The rows of one object lie side by side (the table is sorted); the map holds the
        # last of them, and any whose pack is still live will do.
        while at >= 0 and data[at : at + 32] == raw:
            _, pack, off, ln = _ROW.unpack_from(data, at)
            if pack not in self._skip:
                return self._pack(pack), off, ln
            at -= _ROW.size
        return None

    def names(self) -> set[str]:
        """The index names of the live packs (the table's pack list is read and verified)."""
        return {f"index/{p.hex()}" for p in self.live_packs()}

    def live_packs(self) -> set[bytes]:
        """The raw ids of the live packs."""
        packs = set(self._added)
        if self._table is not None and self._fd is not None and self._table.packs:
            t = self._table
            data = os.pread(self._fd, 32 * t.packs, t.rows_at + _ROW.size * t.rows)
            if len(data) != 32 * t.packs or _sum(data) != t.names_sum:
                raise Damaged("the table's pack list does not match its checksum")
            packs.update(data[i : i + 32] for i in range(0, len(data), 32))
        return packs - self._skip

    def exclude(self, packs: Iterable[str]) -> None:
        """Stop answering with places in ``packs`` (``packs/<id>``): they are gone."""
        ids = {bytes.fromhex(p.split("/", 1)[1]) for p in packs}
        self._skip |= ids
        self._added -= ids
        self._tail, self._buckets = self._tail_map(), {}

    def rows_of_live_packs(self) -> list[bytes]:
        """Every entry of a live pack, ``_ROW``-packed, the table's first (in order), every
        bucket verified: what compaction keeps."""
        skip, size, rows = self._skip, _ROW.size, []
        t = self._table
        if t is not None and self._fd is not None:
            data = os.pread(self._fd, size * t.rows, t.rows_at)
            if len(data) != size * t.rows:
                raise Damaged("the table is cut short")
            view = memoryview(data)
            for bucket, (start, end) in enumerate(zip((0, *t.ends[:-1]), t.ends, strict=True)):
                if _sum(view[start * size : end * size]) != t.sums[bucket * _SUM :
                                                                   (bucket + 1) * _SUM]:
                    raise Damaged(f"bucket {bucket} of the table does not match its checksum")
            rows = [data[i : i + size] for i in range(0, len(data), size)]
            if skip:
                rows = [r for r in rows if r[32:64] not in skip]
        rows += [_ROW.pack(*row) for row in self._tail_rows if row[1] not in skip]
        return rows

    def _tail_map(self) -> dict[bytes, Loc]:
        out: dict[bytes, Loc] = {}
        for d, pack, off, ln in self._tail_rows:
            if d not in out and pack not in self._skip:
                out[d] = (self._pack(pack), off, ln)
        return out

    def _pack(self, raw: bytes) -> str:
        name = self._names.get(raw)
        if name is None:
            name = self._names[raw] = f"packs/{raw.hex()}"
        return name

    def _read_bucket(self, bucket: int) -> bytes:
        t = self._table
        assert t is not None and self._fd is not None
        start = t.ends[bucket - 1] if bucket else 0
        length = (t.ends[bucket] - start) * _ROW.size
        data = os.pread(self._fd, length, t.rows_at + start * _ROW.size) if length else b""
        if len(data) != length or _sum(data) != t.sums[bucket * _SUM : (bucket + 1) * _SUM]:
            raise Damaged(f"bucket {bucket} of the table does not match its checksum")
        return data

    def _bucket(self, bucket: int) -> tuple[bytes, dict[bytes, int]]:
        """A bucket's verified rows, and where each digest's last row starts in them.

        Only the digests are sliced out: a bucket is read whole for what may be one lookup
        (a commit of 300 changed files reads about 300), and unpacking every row of each
        cost that commit 24 ms."""
        data, size = self._read_bucket(bucket), _ROW.size
        return data, {data[at : at + 32]: at for at in range(0, len(data), size)}


class LocalIndex:
    """The merged index of one store on this machine, at ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_path = path.with_name(path.name + ".lock")

    @classmethod
    def for_backend(cls, backend: object) -> LocalIndex | None:
        """The merged index of ``backend``'s store under the cache directory, or None when
        there is nowhere to keep one (then the store reads every index, as without it)."""
        name = Digest.of(scope_of(backend).encode()).hex[:32]
        path = cache_home() / "index" / f"{name}.log"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.debug("no local index: %s", exc)
            return None
        return cls(path)

    @contextlib.contextmanager
    def _locked(self, how: int) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, how)
            yield
        finally:
            os.close(fd)

    def open(self) -> View:
        """The file as it is now; an unusable one is removed (and rebuilt by later adds) and
        a tail that is due is merged into the table (this view keeps the bytes it opened)."""
        try:
            with self._locked(fcntl.LOCK_SH):
                view = self._open()
        except FileNotFoundError:
            return View(None, 0, None, _Tail())
        except OSError as exc:
            log.debug("local index unreadable: %s", exc)
            return View(None, 0, None, _Tail())
        except _DamagedFile as exc:
            self.discard(exc.ino, exc)
            return View(None, 0, None, _Tail())
        if view.needs_compaction:
            self.compact()
        return view

    def _open(self) -> View:
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            try:
                table = _read_table(fd, st.st_size)
                at = table.size if table else 0
                data = os.pread(fd, st.st_size - at, at)
                tail = _read_tail(data)
            except Damaged as exc:
                raise _DamagedFile(st.st_ino, exc) from None
        except BaseException:
            os.close(fd)
            raise
        view = View(fd, st.st_ino, table, tail)
        view.torn = tail.whole < len(data)
        return view

    def discard(self, ino: int, damage: Damaged) -> None:
        """Remove the file that ``damage`` was found in, unless it was replaced since."""
        log.warning("the local index %s is damaged (%s); rebuilding it from the store",
                    self.path, damage)
        with contextlib.suppress(OSError), self._locked(fcntl.LOCK_EX):
            if os.stat(self.path).st_ino == ino:
                self.path.unlink()

    def add(self, packs: Sequence[tuple[str, Iterable[tuple[bytes, int, int]]]], *,
            merge_large: bool = False) -> None:
        """Record packs (id hex, entries) read from their stored indexes. ``merge_large``:
        if that is more than ``COMPACT_ROWS`` entries (a runner's first look at a store),
        merge them into the table now rather than leave them to every later open."""
        if packs:
            record = encode_add(packs)
            self._append(record)
            if merge_large and _HEAD.unpack_from(record)[3] > COMPACT_ROWS:
                self.compact()

    def forget(self, pack_ids: Sequence[str]) -> None:
        """Record packs that are gone from the store, and merge that into the table (the
        caller has just listed the store, which costs more)."""
        if pack_ids:
            self._append(encode_forget(pack_ids))
            self.compact()

    def clear(self) -> None:
        """Remove the file."""
        with contextlib.suppress(OSError), self._locked(fcntl.LOCK_EX):
            self.path.unlink(missing_ok=True)

    def _append(self, record: bytes) -> None:
        # A cache: failing to keep it (a full disk) must not fail the commit or mount.
        try:
            with self._locked(fcntl.LOCK_EX):
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                             0o600)
                try:
                    size = os.fstat(fd).st_size
                    written = os.write(fd, record)
                    if written != len(record):  # a short write: take it back whole
                        os.ftruncate(fd, size)
                finally:
                    os.close(fd)
        except OSError as exc:
            log.debug("local index not updated: %s", exc)

    def compact(self) -> None:
        """Merge the tail into a new table of the live packs, written aside and renamed, all
        under the lock so no append in between is lost."""
        tmp = self.path.with_name(f".{uuid.uuid4().hex}.tmp")
        try:
            with self._locked(fcntl.LOCK_EX):
                try:
                    view = self._open()
                    data = encode_table(view.rows_of_live_packs(), view.live_packs())
                except Damaged as exc:
                    log.warning("the local index %s is damaged (%s); rebuilding it from the "
                                "store", self.path, exc)
                    self.path.unlink(missing_ok=True)
                    return
                except FileNotFoundError:
                    return
                tmp.write_bytes(data)
                os.rename(tmp, self.path)
        except OSError as exc:
            log.debug("local index not compacted: %s", exc)
            with contextlib.suppress(OSError):
                tmp.unlink()

