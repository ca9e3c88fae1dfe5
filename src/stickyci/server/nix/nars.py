"""NARs and narinfos of the Nix caches, kept in the content-addressed store.

An uploaded NAR is decompressed as it arrives (:class:`NarSpool`), hashed by the server, cut by
content-defined chunking into the object store (as a disk's files are, so a new version of a
store path adds only its changed chunks and a file shared by many paths is stored once), and
described by a one-file manifest. A **pin**, ``roots/nix.<cache>.<nar hash>``, names that
manifest (``{"snapshot": hex}``, the root record gc reads): it is what makes the NAR part of
a cache, and what garbage collection keeps live. A
narinfo is kept as ``nix/<cache>.<hash part>`` in its stored form, and is accepted only if its
NAR is pinned in the same cache with the hash and size the server computed.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import lzma
import mmap
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Protocol, cast

import zstandard

from ...chunking import cut
from ...digest import Digest
from ...disks import root_snapshot
from ...errors import IntegrityError, NotFound, TooLarge, UsageError
from ...snapshot import FILE, Entry, Manifest, save_manifest
from ...store import Backend, ObjectStore
from .narinfo import NarInfo, nix32, parse_narinfo

PIN_PREFIX = "roots/nix."
INFO_PREFIX = "nix/"
NAR_MAGIC = b"\x0d\x00\x00\x00\x00\x00\x00\x00nix-archive-1"
_STEP = 1 << 20
UPLOAD_COMPRESSIONS = {"": "none", ".xz": "xz", ".bz2": "bzip2", ".zst": "zstd"}
"""What an uploaded NAR's name may end with (after ``.nar``), and the compression it means."""


def pin_name(cache: str, nar_hash: bytes) -> str:
    """The store name of the pin of a cache's NAR."""
    return f"{PIN_PREFIX}{cache}.{nix32(nar_hash)}"


def info_name(cache: str, hash_part: str) -> str:
    """The store name of a cache's narinfo."""
    return f"{INFO_PREFIX}{cache}.{hash_part}"


class _Decompressor(Protocol):
    def feed(self, data: bytes) -> None: ...
    def end(self) -> None: ...


class NarSpool:
    """An uploaded NAR on its way in: decompressed into a temporary file, hashed, counted.

    ``limit`` bounds the uncompressed size, so a small compressed bomb cannot fill the disk;
    output is produced a MiB at a time, so it cannot fill memory either.
    """

    def __init__(self, compression: str, limit: int) -> None:
        self.limit = limit
        self.size = 0
        # Closed by close(), which the route calls whatever happens to the upload.
        self.file: IO[bytes] = tempfile.TemporaryFile(prefix="stickyci-nar-")  # noqa: SIM115
        self._sha = hashlib.sha256()
        self._head = b""
        self._dec = _decompressor(compression, self)

    def write(self, data: bytes) -> int:
        """Take decompressed bytes (the decompressors' sink)."""
        self.size += len(data)
        if self.size > self.limit:
            raise TooLarge(f"the NAR is over the server's limit of {self.limit} bytes "
                           "uncompressed; raise stickyci serve --max-body")
        if len(self._head) < len(NAR_MAGIC):
            self._head += data[: len(NAR_MAGIC)]
        self._sha.update(data)
        self.file.write(data)
        return len(data)

    def feed(self, data: bytes) -> None:
        """Take the next bytes of the upload as sent."""
        self._dec.feed(data)

    def finish(self) -> tuple[bytes, int]:
        """The SHA-256 and size of the whole NAR; ``UsageError`` if it is not one."""
        self._dec.end()
        if not self._head.startswith(NAR_MAGIC):
            raise UsageError("the upload is not a NAR (no nix-archive-1 header) once "
                             "decompressed; check the compression its name says")
        self.file.flush()
        return self._sha.digest(), self.size

    def close(self) -> None:
        """Drop the temporary file."""
        self.file.close()


def _decompressor(compression: str, sink: NarSpool) -> _Decompressor:
    if compression == "none":
        return _Plain(sink)
    if compression == "zstd":
        return _Zstd(sink)
    if compression in ("xz", "bzip2"):
        return _Stdlib(lzma.LZMADecompressor() if compression == "xz" else
                       bz2.BZ2Decompressor(), compression, sink)
    raise UsageError(f"NAR compression {compression!r} is not accepted; upload with "
                     "?compression=xz, zstd, bzip2 or none")


class _Plain:
    def __init__(self, sink: NarSpool) -> None:
        self.sink = sink

    def feed(self, data: bytes) -> None:
        self.sink.write(data)

    def end(self) -> None:
        pass


class _Stdlib:
    def __init__(self, dec: lzma.LZMADecompressor | bz2.BZ2Decompressor, name: str,
                 sink: NarSpool) -> None:
        self.dec, self.name, self.sink = dec, name, sink

    def feed(self, data: bytes) -> None:
        try:
            if self.dec.eof:
                if data:
                    raise UsageError(f"the {self.name} NAR has data after its end")
                return
            self.sink.write(self.dec.decompress(data, _STEP))
            while not self.dec.eof and not self.dec.needs_input:
                self.sink.write(self.dec.decompress(b"", _STEP))
        except (lzma.LZMAError, OSError, EOFError, ValueError) as exc:  # bz2 raises OSError
            raise UsageError(f"the NAR is not valid {self.name}: {exc}") from exc

    def end(self) -> None:
        if not self.dec.eof:
            raise UsageError(f"the {self.name} NAR is truncated; upload it whole")


class _Zstd:
    def __init__(self, sink: NarSpool) -> None:
        # The writer hands its output to the spool a MiB at a time: a bomb cannot fill memory.
        self.writer = zstandard.ZstdDecompressor().stream_writer(
            cast(IO[bytes], sink), write_size=_STEP, closefd=False)

    def feed(self, data: bytes) -> None:
        try:
            self.writer.write(data)
        except zstandard.ZstdError as exc:
            raise UsageError(f"the NAR is not valid zstd: {exc}") from exc

    def end(self) -> None:
        pass  # write() has passed on everything; a truncated frame fails the NarHash check


@dataclass(frozen=True, slots=True)
class NarRecord:
    """A pinned NAR: its SHA-256, size, manifest and chunks (digest and length, in order)."""

    nar_hash: bytes
    size: int
    manifest: Digest
    chunks: tuple[tuple[Digest, int], ...]


class NarStore:
    """The NARs and narinfos of every Nix cache over one store. Thread-safe."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._lock = threading.Lock()
        self._objects: ObjectStore | None = None

    def objects(self, fresh: bool = False) -> ObjectStore:
        """The object store, loaded on first use (every pack index is read then)."""
        with self._lock:
            if self._objects is None or fresh:
                self._objects = ObjectStore(self.backend)
            return self._objects

    def ingest(self, cache: str, spool: NarSpool) -> NarRecord:
        """Chunk a finished upload into the store and pin it in ``cache``."""
        nar_hash, size = spool.finish()
        try:
            return self._ingest(self.objects(), cache, spool, nar_hash, size)
        except NotFound:
            # A gc swept a pack this upload deduplicated against: start from the store as it is.
            return self._ingest(self.objects(fresh=True), cache, spool, nar_hash, size)

    def _ingest(self, objects: ObjectStore, cache: str, spool: NarSpool, nar_hash: bytes,
                size: int) -> NarRecord:
        objects.refresh()
        chunks: list[tuple[Digest, int]] = []
        with (mmap.mmap(spool.file.fileno(), 0, access=mmap.ACCESS_READ) as mm,
              memoryview(mm) as view):
            pieces = list(cut(view))
            try:
                for piece in pieces:
                    chunks.append((objects.put(piece), len(piece)))
            finally:
                for piece in pieces:  # the mapping can close only once no view of it is left
                    piece.release()
        entry = Entry("nar", FILE, 0o444, 0, size=size,
                      chunks=[[d.hex, n] for d, n in chunks])
        manifest = save_manifest(objects, Manifest({"nar": entry}))
        objects.check_present([manifest.raw, *(d.raw for d, _ in chunks)])
        pin = json.dumps({"snapshot": manifest.hex}).encode()
        self.backend.put(pin_name(cache, nar_hash), pin)
        return NarRecord(nar_hash, size, manifest, tuple(chunks))

    def nar(self, cache: str, nar_hash: bytes) -> NarRecord | None:
        """The cache's NAR with this hash, or None if it has none."""
        name = pin_name(cache, nar_hash)
        try:
            text = self.backend.get(name)
        except NotFound:
            return None
        manifest = root_snapshot(text, name)
        try:
            plain = self.objects().get(manifest)
        except NotFound:
            plain = self.objects(fresh=True).get(manifest)
        entry = Manifest.decode(plain, f"the manifest of {name}").entries.get("nar")
        try:
            assert entry is not None and entry.kind == FILE
            chunks = tuple((Digest.parse(h), int(n)) for h, n in entry.chunks)
            assert sum(n for _, n in chunks) == entry.size
        except (AssertionError, ValueError, TypeError) as exc:
            raise IntegrityError(f"the manifest of {name} does not describe a NAR") from exc
        return NarRecord(nar_hash, entry.size, manifest, chunks)

    def read(self, record: NarRecord) -> Iterator[bytes]:
        """The NAR's chunks in order, each verified against its digest."""
        for digest, length in record.chunks:
            try:
                data = self.objects().get(digest)
            except NotFound:
                data = self.objects(fresh=True).get(digest)
            if len(data) != length:
                raise IntegrityError(f"chunk {digest} of NAR sha256:{nix32(record.nar_hash)} "
                                     f"has {len(data)} bytes, not {length}")
            yield data

    def check(self, record: NarRecord, keep: int) -> list[bytes] | None:
        """Read the whole NAR and check it hashes to its name, before a byte of it is sent;
        return its chunks if it is at most ``keep`` bytes (else they are read again to send).

        ``NotFound`` if a chunk is missing, ``IntegrityError`` if one is damaged."""
        sha = hashlib.sha256()
        kept: list[bytes] | None = [] if record.size <= keep else None
        for data in self.read(record):
            sha.update(data)
            if kept is not None:
                kept.append(data)
        if sha.digest() != record.nar_hash:
            raise IntegrityError(f"NAR sha256:{nix32(record.nar_hash)} does not hash to its "
                                 "name in the store; upload it again")
        return kept

    def put_info(self, cache: str, info: NarInfo) -> None:
        """Keep a narinfo whose NAR is pinned in ``cache`` with the hash and size it states."""
        record = self.nar(cache, info.nar_hash)
        if record is None:
            raise UsageError(f"narinfo of {info.path}: cache {cache} has no NAR with NarHash "
                             f"sha256:{info.nar_name}; upload the NAR first (nix copy does)")
        if record.size != info.nar_size:
            raise UsageError(f"narinfo of {info.path}: NarSize {info.nar_size} is not the "
                             f"{record.size} bytes of its NAR")
        self.backend.put(info_name(cache, info.hash_part), info.render().encode())

    def info(self, cache: str, hash_part: str) -> NarInfo | None:
        """The cache's narinfo for a store path hash, parsed again (the store is not trusted)."""
        name = info_name(cache, hash_part)
        try:
            data = self.backend.get(name)
        except NotFound:
            return None
        try:
            info = parse_narinfo(data, name)
        except UsageError as exc:
            raise IntegrityError(f"{exc}; delete {name}") from exc
        if info.hash_part != hash_part:
            raise IntegrityError(f"{name} describes {info.path}; delete it")
        return info
