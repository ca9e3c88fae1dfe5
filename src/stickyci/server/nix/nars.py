"""NARs and narinfos of the Nix caches, kept in the content-addressed store.

An uploaded NAR is decompressed as it arrives (:class:`NarUpload`), hashed by the server and
spooled (:mod:`.spool`); then, off the uploader's path, :meth:`NarStore.ingest` has its
store paths blanked out (:mod:`.refs`, so a rebuild whose only change is its references adds
nothing), cut by content-defined chunking into the object store (:mod:`.chunks`, so a new
version of a store path adds only its changed chunks), and described by a manifest: the
normalised NAR as its one file ``nar``. A **pin**, ``roots/nix.<cache>.<nar hash>``, names
that manifest (``{"snapshot": hex, "refs": patch list}``; gc reads ``snapshot``): it is what
makes the NAR part of a cache, and what garbage collection keeps live. The patch list lives
in the pin so that a rebuild whose only change is its references writes nothing but its pin. A
narinfo is kept as ``nix/<cache>.<hash part>`` in its stored form, and is accepted only if its
NAR is pinned (or spooled) in the same cache with the hash and size the server computed.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import lzma
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Protocol, cast

import zstandard

from ...digest import Digest
from ...disks import root_snapshot
from ...errors import IntegrityError, NotFound, StoreUnavailable, TooLarge, UsageError
from ...snapshot import FILE, Entry, Manifest, save_manifest
from ...store import Backend, ObjectStore
from .chunks import ChunkStream
from .narinfo import NarInfo, nix32, parse_narinfo
from .refs import Patch, encode_patches, parse_patches, restore

PIN_PREFIX = "roots/nix."
NAR_ENTRY = "nar"
REFS_KEY = "refs"
INFO_PREFIX = "nix/"
NAR_MAGIC = b"\x0d\x00\x00\x00\x00\x00\x00\x00nix-archive-1"
_STEP = 1 << 20
_HASHER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="stickyci-nar-sha")
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


class NarUpload:
    """An uploaded NAR on its way in: decompressed, hashed and counted as it arrives, and
    handed on to ``sink`` (a spool file, or the chunker on the way into the store).

    ``limit`` bounds the uncompressed size, so a small compressed bomb cannot fill the disk;
    output is produced a MiB at a time, so it cannot fill memory either. A piece's SHA-256 is
    computed on a thread of its own while ``sink`` takes the piece: hashing and writing each
    take about as long as receiving the bytes, and ``nix copy`` waits for the slowest.
    """

    def __init__(self, compression: str, limit: int, sink: Callable[[bytes], object]) -> None:
        self.limit = limit
        self.size = 0
        self.sink = sink
        self._sha = hashlib.sha256()
        self._hashing: Future[None] | None = None
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
            if not NAR_MAGIC.startswith(self._head[: len(NAR_MAGIC)]):
                raise _not_a_nar()
        self._hashed()  # one piece in flight: pieces are hashed in order, memory stays bounded
        self._hashing = _HASHER.submit(self._sha.update, data)
        self.sink(data)
        return len(data)

    def _hashed(self) -> None:
        if self._hashing is not None:
            self._hashing.result()
            self._hashing = None

    def feed(self, data: bytes) -> None:
        """Take the next bytes of the upload as sent."""
        self._dec.feed(data)

    def finish(self) -> tuple[bytes, int]:
        """The SHA-256 and size of the whole NAR; ``UsageError`` if it is not one."""
        self._dec.end()
        self._hashed()
        if not self._head.startswith(NAR_MAGIC):
            raise _not_a_nar()
        return self._sha.digest(), self.size


def checked(pieces: Iterable[bytes], nar_hash: bytes, size: int,
            keep: int) -> list[bytes] | None:
    """Read a whole NAR and check it hashes to ``nar_hash``, before a byte of it is sent;
    return its pieces if it is at most ``keep`` bytes (else they are read again to send).
    ``IntegrityError`` if it does not (``NotFound`` from ``pieces`` if a chunk is missing)."""
    sha = hashlib.sha256()
    kept: list[bytes] | None = [] if size <= keep else None
    for data in pieces:
        sha.update(data)
        if kept is not None:
            kept.append(data)
    if sha.digest() != nar_hash:
        raise IntegrityError(f"NAR sha256:{nix32(nar_hash)} does not hash to its name in the "
                             "server's store; upload it again")
    return kept


def _not_a_nar() -> UsageError:
    return UsageError("the upload is not a NAR (no nix-archive-1 header) once decompressed; "
                      "check the compression its name says")


def _decompressor(compression: str, sink: NarUpload) -> _Decompressor:
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
    def __init__(self, sink: NarUpload) -> None:
        self.sink = sink

    def feed(self, data: bytes) -> None:
        self.sink.write(data)

    def end(self) -> None:
        pass


class _Stdlib:
    def __init__(self, dec: lzma.LZMADecompressor | bz2.BZ2Decompressor, name: str,
                 sink: NarUpload) -> None:
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
    def __init__(self, sink: NarUpload) -> None:
        # The writer hands its output on a MiB at a time: a bomb cannot fill memory.
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
    """The chunks of the normalised NAR (:mod:`.refs`)."""
    patches: tuple[Patch, ...] = ()
    """What puts its store paths back."""


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

    def ingest(self, cache: str, pieces: Iterable[bytes], nar_hash: bytes) -> NarRecord:
        """Take a NAR into the store and pin it in ``cache``: its bytes are normalised, cut
        and the chunks the store lacks compressed as they come (packs written since the last
        look are indexed first, so it deduplicates against them). ``IntegrityError`` if the
        bytes do not hash to ``nar_hash``: nothing is pinned then."""
        objects = self.objects()
        objects.refresh()
        stream = ChunkStream(objects)
        incoming = NarUpload("none", 1 << 62, stream.feed)
        try:
            for piece in pieces:
                incoming.feed(piece)
            got, size = incoming.finish()
            if got != nar_hash:
                raise IntegrityError(f"the NAR does not hash to sha256:{nix32(nar_hash)}")
            chunks, patches = stream.finish()
        finally:
            stream.close()
        entry = Entry(NAR_ENTRY, FILE, 0o444, 0, size=size, chunks=[[d.hex, n] for d, n in chunks])
        # A rebuild that only changed references has the manifest of the build before it:
        # nothing new to write but its pin.
        manifest = save_manifest(objects, Manifest({NAR_ENTRY: entry}))
        try:
            objects.check_present([manifest.raw, *(d.raw for d, _ in chunks)])
        except NotFound as exc:
            # A gc swept a pack this upload deduplicated against, and the bytes are gone.
            self.objects(fresh=True)
            raise StoreUnavailable(f"{exc}; nothing was pinned, upload the NAR again",
                                   summary="a concurrent gc removed data this upload "
                                   "shares; upload it again") from exc
        pin: dict[str, str] = {"snapshot": manifest.hex}
        if patches:
            pin[REFS_KEY] = encode_patches(patches).decode()
        self.backend.put(pin_name(cache, nar_hash), json.dumps(pin).encode())
        return NarRecord(nar_hash, size, manifest, tuple(chunks), patches)

    def pinned(self, cache: str, nar_hash: bytes) -> bool:
        """Whether ``cache`` has a pin for this NAR (its bytes are not read)."""
        return self.backend.stat(pin_name(cache, nar_hash)) is not None

    def nar(self, cache: str, nar_hash: bytes) -> NarRecord | None:
        """The cache's NAR with this hash, or None if it has none."""
        name = pin_name(cache, nar_hash)
        try:
            text = self.backend.get(name)
        except NotFound:
            return None
        manifest = root_snapshot(text, name)
        entry = Manifest.decode(self._get(manifest), f"the manifest of {name}").entries.get(
            NAR_ENTRY)
        try:
            assert entry is not None and entry.kind == FILE
            chunks = tuple((Digest.parse(h), int(n)) for h, n in entry.chunks)
            assert sum(n for _, n in chunks) == entry.size
        except (AssertionError, ValueError, TypeError) as exc:
            raise IntegrityError(f"the manifest of {name} does not describe a NAR") from exc
        listing = json.loads(text).get(REFS_KEY, "")  # root_snapshot parsed it as an object
        if not isinstance(listing, str):
            raise IntegrityError(f"the patch list in {name} is not text")
        patches = (parse_patches(listing.encode(), entry.size, f"the patch list in {name}")
                   if listing else ())
        return NarRecord(nar_hash, entry.size, manifest, chunks, patches)

    def _get(self, digest: Digest) -> bytes:
        try:
            return self.objects().get(digest)
        except NotFound:
            return self.objects(fresh=True).get(digest)

    def _chunks(self, record: NarRecord) -> Iterator[bytes]:
        for digest, length in record.chunks:
            data = self._get(digest)
            if len(data) != length:
                raise IntegrityError(f"chunk {digest} of NAR sha256:{nix32(record.nar_hash)} "
                                     f"has {len(data)} bytes, not {length}")
            yield data

    def read(self, record: NarRecord) -> Iterator[bytes]:
        """The NAR's chunks in order, each verified against its digest, its store paths
        written back."""
        return restore(self._chunks(record), record.patches)

    def put_info(self, cache: str, info: NarInfo, spooled: int | None = None) -> None:
        """Keep a narinfo whose NAR is pinned in ``cache`` (or waits in its spool, ``spooled``
        bytes long) with the hash and size it states."""
        record = self.nar(cache, info.nar_hash)
        size = record.size if record is not None else spooled
        if size is None:
            raise UsageError(f"narinfo of {info.path}: cache {cache} has no NAR with NarHash "
                             f"sha256:{info.nar_name}; upload the NAR first (nix copy does)")
        if size != info.nar_size:
            raise UsageError(f"narinfo of {info.path}: NarSize {info.nar_size} is not the "
                             f"{size} bytes of its NAR")
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
