"""NARs received whole and verified, kept as files in the server's state directory until they are
in the store.

``nix copy`` uploads one store path at a time and waits for each answer before it prepares the
next. Taking a NAR into the store (normalising, chunking, compressing what is new) costs the
server more CPU than Nix spends producing it, so doing it before answering puts all of it on
Nix's path. Instead the server writes the NAR as it arrives to a spool file (decompressed, its
SHA-256 and size computed on the way), fsyncs it, and answers: the NAR is durable and served
from there at once. An *ingester* thread then takes spooled NARs into the store in the order
they came, while Nix prepares its next path, and removes each file once its pin is written.
Its Python work holds the interpreter lock the event loop needs, so it waits for a quiet
moment between the requests of the cache, which come in bursts (a path's lookup, its NAR,
its narinfo): ``nix copy`` of the benchmark's five versions took 3% less time.

A spool file is named ``<cache>.<NAR hash in base 32>.nar`` from the hash the server computed,
and a name is parsed back into a cache name and a 32-byte hash before use. A file is never
trusted either: the ingester and every read hash it again. Several server processes share the
directory; each file is taken by one ingester at a time (``flock``), and files a process left
when it died are taken by the next ingester that looks (every ``RESCAN`` seconds, and at start).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ...errors import IntegrityError, StickyError
from ...fsutil import fsync_dir
from .chunks import background
from .keys import check_cache
from .narinfo import nix32, parse_nix32

log = logging.getLogger("stickyci")

SPOOL_DIR = "nix-spool"
RESCAN = 5.0
"""Seconds between two looks for files no ingester was told about (another process's)."""
RETRY = 2.0
"""Seconds before a NAR the store refused (it was down, say) is tried again."""
QUIET = 0.03
"""Seconds without a request of the Nix cache before the ingester stores its next MiB."""
PATIENCE = 1.0
"""At most this long the ingester waits for a quiet moment per MiB, so that a steady stream
of requests cannot stop it."""
_libc = ctypes.CDLL(None, use_errno=True)
_sync_file_range = _libc.sync_file_range
_sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_SYNC_FILE_RANGE_WRITE = 2
WRITEBACK = 4 << 20
"""Bytes of a spool file written between two requests to the kernel to start writing them."""
_SUFFIX = ".nar"


@dataclass(frozen=True, slots=True)
class Spooled:
    """A spooled NAR: its cache, SHA-256 and file."""

    cache: str
    nar_hash: bytes
    path: Path


class SpoolFile:
    """A NAR being written to the spool: a temporary file until :meth:`Spool.keep`."""

    def __init__(self, root: Path) -> None:
        self.path = root / f".{uuid.uuid4().hex}.part"
        self.file: IO[bytes] = open(self.path, "xb")  # noqa: SIM115 (closed by keep or drop)
        fcntl.flock(self.file.fileno(), fcntl.LOCK_EX)  # not stale while this upload runs
        self.size = self.flushed = 0

    def write(self, data: bytes) -> None:
        """Append decompressed bytes of the NAR."""
        self.file.write(data)
        self.size += len(data)
        if self.size - self.flushed >= WRITEBACK:
            # Have the kernel start writing what arrived so far, so that the fsync before the
            # answer waits for the last few MiB only, not the whole NAR.
            self.file.flush()
            _sync_file_range(self.file.fileno(), self.flushed, self.size - self.flushed,
                             _SYNC_FILE_RANGE_WRITE)
            self.flushed = self.size

    def drop(self) -> None:
        """Remove what an upload that did not finish wrote."""
        self.file.close()
        self.path.unlink(missing_ok=True)


class Spool:
    """The spool directory of one server's state, and its ingester.

    ``ingest(cache, nar_hash, file)`` takes one spooled NAR into the store (it raises
    ``IntegrityError`` if the file does not hash to its name); it runs on the ingester thread.
    """

    def __init__(self, state_dir: Path, ingest: Callable[[str, bytes, IO[bytes]], None]) -> None:
        self.root = state_dir / SPOOL_DIR
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for stale in self.root.glob(".*.part"):  # uploads a dead process did not finish
            with contextlib.suppress(OSError):
                if _stale(stale):
                    stale.unlink()
        self._ingest = ingest
        self._quiet = threading.Condition()
        self._serving = 0
        self._last = 0.0  # when the last request ended (monotonic)
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stickyci-nix-spool",
                                        daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """Around a request of the Nix cache: the ingester waits for a quiet moment."""
        with self._quiet:
            self._serving += 1
        try:
            yield
        finally:
            with self._quiet:
                self._serving -= 1
                self._last = time.monotonic()
                self._quiet.notify_all()

    def paced(self, pieces: Iterable[bytes]) -> Iterator[bytes]:
        """``pieces`` (a spooled NAR's, on their way into the store), each handed on once no
        request has been served for ``QUIET`` seconds, or after ``PATIENCE`` at most."""
        for piece in pieces:
            deadline = time.monotonic() + PATIENCE
            with self._quiet:
                while (wait := self._busy_for(deadline)) > 0:
                    self._quiet.wait(wait)
            yield piece

    def _busy_for(self, deadline: float) -> float:
        """How long to wait yet (0: go on); the condition's lock is held."""
        now = time.monotonic()
        if now >= deadline:
            return 0.0
        if self._serving:
            return deadline - now
        return max(0.0, min(self._last + QUIET, deadline) - now)

    def begin(self) -> SpoolFile:
        """A new spool file for an upload."""
        return SpoolFile(self.root)

    def keep(self, part: SpoolFile, cache: str, nar_hash: bytes) -> None:
        """Make ``part`` the durable spool file of ``cache``'s NAR ``nar_hash``, and have it
        taken into the store."""
        part.file.flush()
        os.fsync(part.file.fileno())
        part.file.close()
        os.rename(part.path, self._path(cache, nar_hash))
        fsync_dir(self.root)
        self._wake.set()

    def size(self, cache: str, nar_hash: bytes) -> int | None:
        """The size of ``cache``'s spooled NAR ``nar_hash``, or None if it is not spooled."""
        try:
            return self._path(cache, nar_hash).stat().st_size
        except FileNotFoundError:
            return None

    def open(self, cache: str, nar_hash: bytes) -> IO[bytes] | None:
        """``cache``'s spooled NAR ``nar_hash``, open for reading (it stays readable when the
        ingester removes it meanwhile), or None if it is not spooled."""
        try:
            return open(self._path(cache, nar_hash), "rb")
        except FileNotFoundError:
            return None

    def pending(self) -> list[Spooled]:
        """Every spooled NAR, oldest first; files whose names do not parse are left out."""
        found = []
        try:
            paths = list(self.root.iterdir())
        except FileNotFoundError:  # the state directory went (a test's, say): nothing to do
            return []
        for path in paths:
            item = _parse(path)
            if item is not None:
                with contextlib.suppress(FileNotFoundError):
                    found.append((path.stat().st_mtime_ns, item))
        return [item for _, item in sorted(found, key=lambda f: f[0])]

    def backlog(self) -> tuple[int, int]:
        """How many NARs, and how many bytes, were answered and wait to be stored."""
        count = size = 0
        for item in self.pending():
            with contextlib.suppress(FileNotFoundError):  # stored meanwhile
                size += item.path.stat().st_size
                count += 1
        return count, size

    def _path(self, cache: str, nar_hash: bytes) -> Path:
        return self.root / f"{cache}.{nix32(nar_hash)}{_SUFFIX}"

    def _run(self) -> None:
        background()
        while True:
            self._wake.wait(RESCAN)
            self._wake.clear()
            retry = False
            try:
                for item in self.pending():
                    retry |= not self._take(item)
            except Exception:  # a bug: the ingester must go on, the files stay for the next look
                log.exception("the Nix spool's ingester failed")
                retry = True
            if retry:
                self._wake.wait(RETRY)
                self._wake.set()

    def _take(self, item: Spooled) -> bool:
        """Ingest one spooled NAR if no other ingester has it; False if it must be tried
        again later."""
        try:
            fd = os.open(item.path, os.O_RDONLY)
        except FileNotFoundError:
            return True  # another process took it in meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True  # another process is taking it in
            if os.fstat(fd).st_nlink == 0:
                return True  # taken in and removed between our listing and our lock
            try:
                with os.fdopen(fd, "rb", closefd=False) as f:
                    self._ingest(item.cache, item.nar_hash, f)
            except IntegrityError as exc:
                log.error("spooled NAR %s of Nix cache %s is damaged, removed: %s",
                          item.path.name, item.cache, exc)
            except (StickyError, OSError) as exc:
                log.warning("spooled NAR %s of Nix cache %s is not in the store yet (%s); "
                            "trying again", item.path.name, item.cache, exc)
                return False
            item.path.unlink(missing_ok=True)
            return True
        finally:
            os.close(fd)


def _parse(path: Path) -> Spooled | None:
    """A spool file's name as a cache and a hash, or None if it is no spooled NAR's."""
    cache, dot, rest = path.name.partition(".")
    text = rest.removesuffix(_SUFFIX)
    if not dot or text == rest:
        return None
    try:
        return Spooled(check_cache(cache), parse_nix32(text, 32), path)
    except (StickyError, ValueError):
        return None


def _stale(path: Path) -> bool:
    """Whether the upload that was writing ``path`` is over: it holds a lock while it runs."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
