"""A runner's merged index of a store: every stored pack index it has read, in one local file.

Packs and their indexes are immutable and named by content, so an entry never goes stale while
its pack exists; what changes is which packs exist. ``ObjectStore.refresh`` lists the store's
indexes once, reads only those this file does not hold, and records those that are gone (gc
swept them), so its reads grow with what changed, not with the store.

The file is a log of records, appended under a lock: *add* (packs and their entries, as read
from their stored indexes) and *forget* (packs that are gone). Each record ends with the
BLAKE3 of its bytes. It is a cache, so it is never trusted blindly: a record that does not
verify makes the whole file go (it is rebuilt from the store), a torn last record (a writer
killed mid-append) is cut off, and whatever an entry says is read back from its pack and
verified by digest. Only stored indexes go in, never a server's partial view, and there is one
file per store and credential (:func:`scope_of`), so one token's entries never show to another.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..digest import Digest
from ..paths import cache_home

log = logging.getLogger("stickyci")

_HEAD = struct.Struct("<4sBII")  # magic, kind, packs, entries
_ROW = struct.Struct("<32sIQI")  # digest, pack number within the record, offset, length
_MAGIC = b"SCXL"
_ADD, _FORGET = 1, 2
_CHECK = 32
COMPACT_RECORDS = 64
"""Rewrite the log as one record once it holds more records than this."""

Loc = tuple[str, int, int]  # "packs/<id>", offset, length


def scope_of(backend: object) -> str:
    """What names a backend's merged index: its ``cache_scope`` (the URL plus whatever else
    decides what it shows, such as a token) or, failing that, its URL."""
    return str(getattr(backend, "cache_scope", None) or getattr(backend, "url", ""))


@dataclass(slots=True)
class Loaded:
    """What the file holds: the index names of live packs and their entries. ``extra`` are
    further places of digests that two packs hold, so forgetting one pack keeps the other."""

    names: set[str] = field(default_factory=set)
    entries: dict[bytes, Loc] = field(default_factory=dict)
    extra: list[tuple[bytes, Loc]] = field(default_factory=list)
    records: int = 0
    forgotten: int = 0


def encode_add(packs: Sequence[tuple[str, Iterable[tuple[bytes, int, int]]]]) -> bytes:
    """An *add* record: each pack id (hex) with its entries (raw digest, offset, length)."""
    ids: list[bytes] = []
    rows: list[bytes] = []
    for number, (pack_id, entries) in enumerate(packs):
        ids.append(bytes.fromhex(pack_id))
        rows.extend(_ROW.pack(d, number, off, ln) for d, off, ln in entries)
    return _seal(_HEAD.pack(_MAGIC, _ADD, len(ids), len(rows)) + b"".join(ids) + b"".join(rows))


def encode_forget(pack_ids: Sequence[str]) -> bytes:
    """A *forget* record: packs that are gone from the store."""
    return _seal(_HEAD.pack(_MAGIC, _FORGET, len(pack_ids), 0)
                 + b"".join(bytes.fromhex(p) for p in pack_ids))


def _seal(body: bytes) -> bytes:
    return body + Digest.of(body).raw


class Damaged(Exception):
    """A record that does not verify: the file is not to be used."""


def decode(data: bytes, *, extra: bool = False) -> tuple[Loaded, int]:
    """The packs and entries of a log, and how many of its bytes are whole records (a torn
    last record is left out). ``Damaged`` if a record does not verify. ``extra`` also
    collects the further places of digests that several packs hold."""
    records: list[tuple[int, list[str], memoryview]] = []
    view, pos = memoryview(data), 0
    while pos < len(data):
        if len(data) - pos < _HEAD.size:
            break
        magic, kind, packs, rows = _HEAD.unpack_from(data, pos)
        if magic != _MAGIC or kind not in (_ADD, _FORGET):
            raise Damaged(f"a record at byte {pos} has no valid header")
        end = pos + _HEAD.size + 32 * packs + _ROW.size * rows
        if end + _CHECK > len(data):
            break
        if Digest.of(view[pos:end]).raw != data[end : end + _CHECK]:
            raise Damaged(f"the record at byte {pos} does not match its checksum")
        ids_at = pos + _HEAD.size
        ids = [data[i : i + 32].hex() for i in range(ids_at, ids_at + 32 * packs, 32)]
        records.append((kind, ids, view[ids_at + 32 * packs : end]))
        pos = end + _CHECK
    gone = {p for kind, ids, _ in records if kind == _FORGET for p in ids}
    # A forget record drops a pack whatever came before it; a pack added again after it was
    # forgotten (gc swept it, then the same bytes were stored again) is back.
    live: set[str] = set()
    for kind, ids, _ in records:
        if kind == _ADD:
            live.update(ids)
        else:
            live.difference_update(ids)
    out = Loaded(records=len(records), forgotten=len(gone - live))
    for kind, ids, rows in records:
        if kind != _ADD:
            continue
        packs = [f"packs/{p}" if p in live else "" for p in ids]
        try:
            if extra:
                _take_all(out, packs, rows)
            else:
                _take_first(out, packs, rows)
        except IndexError:
            raise Damaged("an entry names a pack its record does not list") from None
    out.names = {f"index/{p}" for p in live}
    return out, pos


def _take_first(out: Loaded, packs: list[str], rows: memoryview) -> None:
    # One comprehension per record: loading the index is on the path of every commit, and
    # a loop with branches per entry costs twice as much.
    if all(packs):
        got = {d: (packs[n], off, ln) for d, n, off, ln in _ROW.iter_unpack(rows)}
    else:
        got = {d: (packs[n], off, ln) for d, n, off, ln in _ROW.iter_unpack(rows) if packs[n]}
    if not out.entries:
        out.entries = got
        return
    entries = out.entries
    for d, loc in got.items():
        entries.setdefault(d, loc)


def _take_all(out: Loaded, packs: list[str], rows: memoryview) -> None:
    entries, extra = out.entries, out.extra
    for d, n, off, ln in _ROW.iter_unpack(rows):
        if not packs[n]:
            continue
        if d in entries:
            extra.append((d, (packs[n], off, ln)))
        else:
            entries[d] = (packs[n], off, ln)


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

    def load(self, *, extra: bool = False) -> Loaded:
        """What the file holds (``extra``: see :func:`decode`); an unusable file is removed
        (and rebuilt by later adds)."""
        try:
            with self._locked(fcntl.LOCK_SH):
                data = self.path.read_bytes()
        except FileNotFoundError:
            return Loaded()
        except OSError as exc:
            log.debug("local index unreadable: %s", exc)
            return Loaded()
        try:
            got, whole = decode(data, extra=extra)
        except Damaged as exc:
            log.warning("the local index %s is damaged (%s); rebuilding it from the store",
                        self.path, exc)
            self.clear()
            return Loaded()
        if whole < len(data) or got.records > COMPACT_RECORDS or got.forgotten:
            self._compact()
        return got

    def add(self, packs: Sequence[tuple[str, Iterable[tuple[bytes, int, int]]]]) -> None:
        """Record packs (id hex, entries) read from their stored indexes."""
        if packs:
            self._append(encode_add(packs))

    def forget(self, pack_ids: Sequence[str]) -> None:
        """Record packs that are gone from the store."""
        if pack_ids:
            self._append(encode_forget(pack_ids))

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

    def _compact(self) -> None:
        """Replace the log with one record of its live packs, written aside and renamed, all
        under the lock so no append in between is lost."""
        tmp = self.path.with_name(f".{uuid.uuid4().hex}.tmp")
        try:
            with self._locked(fcntl.LOCK_EX):
                try:
                    got, _ = decode(self.path.read_bytes(), extra=True)
                except Damaged:
                    self.path.unlink(missing_ok=True)
                    return
                by_pack: dict[str, list[tuple[bytes, int, int]]] = {
                    n.removeprefix("index/"): [] for n in got.names}
                for d, (pack, off, ln) in [*got.entries.items(), *got.extra]:
                    by_pack[pack.removeprefix("packs/")].append((d, off, ln))
                tmp.write_bytes(encode_add(list(by_pack.items())))
                os.rename(tmp, self.path)
        except OSError as exc:
            log.debug("local index not compacted: %s", exc)
            with contextlib.suppress(OSError):
                tmp.unlink()
