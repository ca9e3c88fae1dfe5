"""The GitHub Actions cache's entries: matching keys, uploads in progress, and their archives.

An entry is a key, a version and an archive. The archive goes into the content-addressed store
as a one-file snapshot: a zstd archive (what ``@actions/cache`` uploads when zstd is installed)
is decompressed first and its tar chunked, so successive versions of a cache share the chunks
of every file that did not change; anything else (gzip, or zstd that does not decode within
limits) is chunked as uploaded. A download re-compresses a decompressed archive with zstd.
The entry's record is ``roots/gha.<id>`` in the store, which keeps its snapshot live through
``disk gc``. Uploads are staged under the state directory until finalized.

Entries are matched as GitHub does: the key exactly, then as a prefix, then each restore key
the same way; among prefix matches the newest wins; only entries of the same version count.
Tokens' patterns apply to cache keys: a key a token may not read is never matched for it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import itertools
import json
import logging
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import zstandard

from ...chunking import cut
from ...digest import Digest
from ...errors import IntegrityError, NotFound, TooLarge, UsageError
from ...snapshot import FILE, Entry, Manifest, load_manifest, save_manifest
from ...store import Backend, ObjectStore
from ..auth import Permission, Principal
from .tar import Readable, tar_pieces

log = logging.getLogger("stickyci.server")

ROOTS = "roots"
PREFIX = "gha."
MAX_KEY = 512
MAX_VERSION = 512
MAX_BLOCKS = 50_000
MAX_BLOCK_ID = 64
UPLOAD_TTL = 3600.0
"""How long an upload may stay unfinalized (and its signed URL valid)."""
TOUCH_EVERY = 600.0
"""A hit rewrites an entry's record at most this often: eviction works in days."""
INFLATE_LIMIT = 16
"""A zstd archive is decompressed only up to this many times ``--max-body``; beyond that it is
stored as uploaded (a decompression bomb costs the server no more than a plain archive)."""
READ_SIZE = 8 << 20
WINDOW = 16 << 20
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ARCHIVE = "archive"
UPLOAD_RECORD = "upload.json"
"""An upload's key, version, writer and start, in its staging directory."""


@dataclass(slots=True)
class CacheEntry:
    """A finalized cache entry. ``inflated``: its snapshot holds the decompressed tar."""

    id: int
    key: str
    version: str
    snapshot: Digest
    size: int
    inflated: bool
    created: float
    last_used: float
    writer: str

    def encode(self) -> bytes:
        """The record's JSON."""
        doc = asdict(self)
        doc["snapshot"] = self.snapshot.hex
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes, name: str) -> CacheEntry:
        """Parse a record; anything malformed is an ``IntegrityError`` naming it."""
        try:
            doc = json.loads(data)
            entry = cls(id=doc["id"], key=doc["key"], version=doc["version"],
                        snapshot=Digest.parse(doc["snapshot"]), size=doc["size"],
                        inflated=doc["inflated"], created=doc["created"],
                        last_used=doc["last_used"], writer=doc["writer"])
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"{name} is not a cache entry record ({exc})") from exc
        types = ((entry.id, int), (entry.key, str), (entry.version, str), (entry.size, int),
                 (entry.inflated, bool), (entry.created, (int, float)),
                 (entry.last_used, (int, float)), (entry.writer, str))
        if not all(isinstance(v, t) for v, t in types) or f"{ROOTS}/{PREFIX}{entry.id}" != name:
            raise IntegrityError(f"{name} is not a cache entry record (a field has the "
                                 "wrong type, or the id is not its name's)")
        return entry


@dataclass(frozen=True, slots=True)
class Stored:
    """A finalized entry, the bytes its archive holds (decompressed) and those new to the
    store (before compression): what deduplication saved."""

    entry: CacheEntry
    content: int
    new: int


@dataclass(slots=True)
class Upload:
    """An entry created but not finalized: where its archive is staged, and by whom."""

    id: int
    key: str
    version: str
    writer: str
    created: float
    dir: Path

    @property
    def archive(self) -> Path:
        """The staged archive, once uploaded whole or committed from blocks."""
        return self.dir / ARCHIVE

    def block(self, block_id: str) -> Path:
        """Where a block is staged; the id is parsed, never used as a path."""
        return self.dir / "blocks" / block_name(block_id)


def block_name(block_id: str) -> str:
    """The file name of an Azure block id (base64 of at most 64 bytes), as hex."""
    try:
        raw = base64.b64decode(block_id, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise UsageError(f"block id {block_id[:80]!r} is not base64") from exc
    if not 0 < len(raw) <= MAX_BLOCK_ID:
        raise UsageError(f"block id {block_id[:80]!r}: a block id is 1 to {MAX_BLOCK_ID} bytes")
    return raw.hex()


def check_key(key: str, what: str = "cache key") -> str:
    """A cache key as GitHub accepts it: at most 512 characters, no comma."""
    if not key or len(key) > MAX_KEY or "," in key:
        raise UsageError(f"{what} {key[:80]!r}: a key is 1 to {MAX_KEY} characters without "
                         "commas")
    return key


def check_version(version: str) -> str:
    """A cache version: the client's hash of paths and compression, at most 512 characters."""
    if not version or len(version) > MAX_VERSION:
        raise UsageError(f"cache version {version[:80]!r}: 1 to {MAX_VERSION} characters")
    return version


class GhaCache:
    """Entries (in memory, persisted as root records), uploads in progress, and archives."""

    def __init__(self, backend: Backend, state_dir: Path, max_archive: int,
                 clean: bool = True) -> None:
        self.backend = backend
        self.max_archive = max_archive
        self.staging = state_dir / "gha-uploads"
        # Uploads do not survive a restart (their signed URLs name them): start clean. The
        # workers of one server share the staging directory (an upload's requests may reach
        # any of them): their supervisor cleans it once.
        if clean:
            shutil.rmtree(self.staging, ignore_errors=True)
        self.objects = ObjectStore(backend, load_index=False)
        self._entries: dict[int, CacheEntry] | None = None
        self._lock = threading.RLock()

    def reload(self) -> None:
        """Read the entries from the store again on next use (another worker changed them)."""
        with self._lock:
            self._entries = None

    # -- entries ---------------------------------------------------------------------------

    def entries(self) -> dict[int, CacheEntry]:
        """Every finalized entry, read from the store on first use."""
        with self._lock:
            if self._entries is None:
                found = {}
                for name in self.backend.list(ROOTS):
                    if not name.startswith(f"{ROOTS}/{PREFIX}"):
                        continue
                    try:
                        entry = CacheEntry.decode(self.backend.get(name), name)
                    except NotFound:
                        continue
                    except IntegrityError as exc:
                        log.warning("ignoring %s", exc)
                        continue
                    found[entry.id] = entry
                self._entries = found
            return self._entries

    def match(self, who: Principal, key: str, restore_keys: list[str],
              version: str) -> CacheEntry | None:
        """The entry GitHub would restore for these keys, among those ``who`` may read."""
        readable = [e for e in list(self.entries().values())  # a copy: uploads add to it
                    if e.version == version and who.scope.allows(Permission.READ, e.key)]
        for k in (key, *restore_keys):
            exact = [e for e in readable if e.key == k]
            found = exact or [e for e in readable if e.key.startswith(k)]
            if found:
                return max(found, key=lambda e: (e.created, e.id))
        return None

    def touch(self, entry: CacheEntry, now: float | None = None) -> None:
        """Record a hit; the record is rewritten only if its time is stale."""
        now = now or time.time()
        if now - entry.last_used >= TOUCH_EVERY:
            entry.last_used = now
            self.backend.put(f"{ROOTS}/{PREFIX}{entry.id}", entry.encode())
        else:
            entry.last_used = max(entry.last_used, now)

    def find(self, entry_id: int) -> CacheEntry:
        """A finalized entry by id."""
        entry = self.entries().get(entry_id)
        if entry is None:
            raise NotFound(f"cache entry {entry_id} does not exist (evicted?)")
        return entry

    # -- uploads ---------------------------------------------------------------------------

    def create(self, who: Principal, key: str, version: str) -> Upload | str:
        """Start an upload, or say why not (an entry or an upload with this key exists)."""
        now = time.time()
        self.drop_stale(now)  # abandoned uploads go even on a server that never evicts
        entries = self.entries()
        with self._lock, self._staging_lock():
            if any(e.key == key and e.version == version for e in entries.values()):
                return f"an entry with key {key!r} and this version already exists"
            if any(u.key == key and u.version == version and now - u.created < UPLOAD_TTL
                   for u in self._uploads()):
                return f"another job is uploading key {key!r} with this version"
            entry_id = secrets.randbits(52)  # a JavaScript number holds it exactly
            upload = Upload(entry_id, key, version, who.id, now, self.staging / str(entry_id))
            (upload.dir / "blocks").mkdir(parents=True)
            (upload.dir / UPLOAD_RECORD).write_text(json.dumps(
                {"key": key, "version": version, "writer": who.id, "created": now}))
        return upload

    def upload(self, entry_id: int) -> Upload:
        """An upload in progress, by the id its signed URL names."""
        upload = self._staged(self.staging / str(entry_id))
        if upload is None:
            raise NotFound(f"no upload in progress for cache entry {entry_id}; create the "
                           "entry again")
        return upload

    def commit_blocks(self, upload: Upload, block_ids: list[str]) -> int:
        """Assemble the archive from this upload's blocks, in order; returns its size."""
        if len(block_ids) > MAX_BLOCKS:
            raise UsageError(f"a block list of {len(block_ids)} blocks; at most {MAX_BLOCKS}")
        paths = [upload.block(b) for b in block_ids]
        total = 0
        for b, path in zip(block_ids, paths, strict=True):
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                raise UsageError(f"block {b[:80]!r} was not uploaded for this entry") from None
        if total > self.max_archive:
            raise TooLarge(f"an archive of {total} bytes is over the server's limit of "
                           f"{self.max_archive}; raise stickyci serve --max-body")
        part = upload.dir / f"{ARCHIVE}.part"
        with open(part, "wb") as out:
            for path in paths:
                with open(path, "rb") as src:
                    shutil.copyfileobj(src, out, READ_SIZE)
        part.rename(upload.archive)
        return total

    def finalize(self, who: Principal, key: str, version: str, size: int) -> Stored:
        """Check the staged archive's size, store it, and publish the entry."""
        with self._lock:
            found = [u for u in self._uploads() if u.key == key and u.version == version
                     and u.writer == who.id]
            if not found:
                raise NotFound(f"no upload of key {key!r} with this version by token {who.id} "
                               "is in progress; create the entry first")
            upload = found[0]
            try:
                actual = upload.archive.stat().st_size
            except FileNotFoundError:
                raise UsageError(f"the archive of key {key!r} was never uploaded; upload it "
                                 "before finalizing") from None
            if actual != size:
                raise UsageError(f"finalize of key {key!r} says {size} bytes but "
                                 f"{actual} were uploaded; nothing was stored")
            try:  # one finalize per upload, even if two race (in two workers, too)
                (upload.dir / UPLOAD_RECORD).rename(upload.dir / f"{UPLOAD_RECORD}.taken")
            except FileNotFoundError:
                raise NotFound(f"the upload of key {key!r} is being finalized already") from None
        try:
            stored = self._store(upload)
        finally:
            shutil.rmtree(upload.dir, ignore_errors=True)
        with self._lock:
            self.entries()[stored.entry.id] = stored.entry
        return stored

    def _store(self, upload: Upload) -> Stored:
        try:
            return self._ingest(upload, self.objects)
        except NotFound:
            # A gc swept or repacked a pack this upload deduplicated against: once more, with
            # the indexes as they are now.
            return self._ingest(upload, self._fresh())

    def _fresh(self) -> ObjectStore:
        """A new view of the objects, every index read again; it replaces the shared one."""
        objects = ObjectStore(self.backend)
        with self._lock:
            self.objects = objects
        return objects

    def _ingest(self, upload: Upload, objects: ObjectStore) -> Stored:
        size = upload.archive.stat().st_size
        with open(upload.archive, "rb") as f:
            inflated = f.read(4) == ZSTD_MAGIC
        objects.refresh()  # dedup against what others stored since
        # ``written`` lists the packs this process wrote, which check_present takes as safe
        # from gc; in a long-lived server they are not (an evicted entry's packs go), so only
        # the packs of uploads in flight may count as such.
        objects.written.clear()
        chunker = _Chunker(objects)
        if inflated:
            try:
                with open(upload.archive, "rb") as f:
                    reader = zstandard.ZstdDecompressor(max_window_size=1 << 31).stream_reader(
                        f, read_size=READ_SIZE, read_across_frames=True)
                    chunks = chunker.chunk(tar_pieces(reader), self.max_archive * INFLATE_LIMIT)
            except (zstandard.ZstdError, TooLarge) as exc:
                log.info("cache entry %s stored as uploaded: %s", upload.id, exc)
                inflated = False
        if not inflated:
            chunker = _Chunker(objects)
            with open(upload.archive, "rb") as f:
                chunks = chunker.chunk(_reads(f), None)
        content = sum(int(c[1]) for c in chunks)
        manifest = Manifest({ARCHIVE: Entry(ARCHIVE, FILE, 0o644, 0, size=content,
                                            chunks=chunks)})
        snapshot = save_manifest(objects, manifest)
        # A gc racing this store may have swept an old pack a chunk was deduplicated against.
        objects.check_present([snapshot.raw, *(bytes.fromhex(c[0]) for c in chunks)])
        now = time.time()
        entry = CacheEntry(upload.id, upload.key, upload.version, snapshot, size, inflated,
                           now, now, upload.writer)
        self.backend.put(f"{ROOTS}/{PREFIX}{entry.id}", entry.encode())
        return Stored(entry, content, chunker.new)

    # -- reading ---------------------------------------------------------------------------

    def chunks(self, entry: CacheEntry) -> list[Digest]:
        """The objects of an entry's archive, in order."""
        try:
            manifest = load_manifest(self.objects, entry.snapshot)
        except NotFound:  # its pack repacked by a gc since the indexes were read
            manifest = load_manifest(self._fresh(), entry.snapshot)
        if ARCHIVE not in manifest.entries or len(manifest.entries) != 1:
            raise IntegrityError(f"snapshot {entry.snapshot} is not a cache archive")
        return [Digest.parse(c[0]) for c in manifest.entries[ARCHIVE].chunks]

    def read(self, digest: Digest) -> bytes:
        """One object of an archive, verified."""
        try:
            return self.objects.get(digest)
        except NotFound:
            return self._fresh().get(digest)

    # -- eviction --------------------------------------------------------------------------

    def drop_stale(self, now: float) -> None:
        """Forget uploads older than ``UPLOAD_TTL`` (their URLs have expired) and their files."""
        with self._lock, self._staging_lock():
            stale = [u for u in self._uploads() if now - u.created >= UPLOAD_TTL]
            for u in stale:
                (u.dir / UPLOAD_RECORD).unlink(missing_ok=True)
        for u in stale:
            shutil.rmtree(u.dir, ignore_errors=True)

    def _uploads(self) -> list[Upload]:
        """The uploads in progress, as staged (by any worker of this server)."""
        if not self.staging.is_dir():
            return []
        return [u for d in self.staging.iterdir() if (u := self._staged(d)) is not None]

    def _staged(self, d: Path) -> Upload | None:
        """The upload staged in ``d``, unless it is gone or being finalized."""
        try:
            doc = json.loads((d / UPLOAD_RECORD).read_bytes())
            return Upload(int(d.name), str(doc["key"]), str(doc["version"]),
                          str(doc["writer"]), float(doc["created"]), d)
        except (OSError, ValueError, KeyError, TypeError):
            return None  # gone, taken, or not an upload: the server's own directory

    @contextlib.contextmanager
    def _staging_lock(self) -> Iterator[None]:
        # Workers check and start uploads one at a time, so two never take one key.
        self.staging.mkdir(parents=True, exist_ok=True)
        with open(self.staging / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def evict(self, ttl: float, now: float | None = None) -> list[CacheEntry]:
        """Remove entries unused for ``ttl`` seconds (gc then frees their chunks) and drop
        uploads older than ``UPLOAD_TTL``."""
        now = now or time.time()
        self.drop_stale(now)
        self.reload()  # the last uses other workers recorded, as the store has them
        victims = [e for e in list(self.entries().values()) if now - e.last_used >= ttl]
        for e in victims:
            self.backend.delete(f"{ROOTS}/{PREFIX}{e.id}")
            with self._lock:
                self.entries().pop(e.id, None)
        return victims


class _Chunker:
    """Cuts a stream into chunks by content and stores them, counting the bytes that were new.

    ``None`` in the stream forces a cut there. Within a stretch, the cuts are those of the
    whole stretch: the tail of each window is cut again with what follows it.
    """

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects
        self.new = 0

    def chunk(self, reads: Iterator[bytes | None], limit: int | None) -> list[list[Any]]:
        """The ``[hex digest, length]`` of each chunk of the stream, in order."""
        chunks: list[list[Any]] = []
        buf = b""
        total = 0
        for data in itertools.chain(reads, [None]):
            if data is None:
                chunks.extend(self._put(piece) for piece in (cut(buf) if buf else ()))
                buf = b""
                continue
            total += len(data)
            if limit is not None and total > limit:
                raise TooLarge(f"the archive decompresses to over {limit} bytes")
            buf += data
            if len(buf) < WINDOW:
                continue
            pieces = list(cut(buf))
            chunks.extend(self._put(piece) for piece in pieces[:-1])
            buf = bytes(pieces[-1])
        return chunks

    def _put(self, piece: memoryview) -> list[Any]:
        digest = Digest.of(piece)
        if not self.objects.has(digest):
            self.new += len(piece)
            self.objects.put(piece, digest)
        return [digest.hex, len(piece)]


def _reads(f: Readable) -> Iterator[bytes]:
    while data := f.read(READ_SIZE):
        yield data

