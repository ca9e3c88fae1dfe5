"""A normalised NAR into the object store: cut into content-defined chunks, new ones compressed
in parallel threads.

NAR chunks are cut larger than a disk's files (``stickyci.chunking``): each chunk is compressed
on its own, and a NAR is mostly many small files of one package whose common words a
compressor learns again in every chunk, so larger chunks store fewer bytes. With references
normalised (:mod:`.refs`) a rebuild changes no chunk, so what larger chunks cost is only on
files that really changed. Measured in ``bench/nix_cache.py`` (``docs/benchmarks.md``).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from pyfastcdc import FastCDC

from ... import codec
from ...digest import Digest
from ...store import ObjectStore
from .refs import Patch, normalise_from

AVG_SIZE = 1 << 20
MIN_SIZE = 256 << 10
MAX_SIZE = 4 << 20
TEXT_LEVEL = 9
TEXT_RATIO = 0.2
"""A chunk that the store's level (``codec.LEVEL``) shrinks below this share is text-like
(sources, headers, scripts): a slower level on it takes a quarter or more off what is left,
where on object code it would cost several times that level's time for a few percent
(measured on the benchmark's closure)."""
IN_FLIGHT = 16
"""Chunks handed to the pool ahead of the one being stored: bounds the envelopes in memory."""
STEP = 8 << 20
"""Bytes gathered between two cuts."""

BACKGROUND_NICE = 10
"""The nice value of the threads that store NARs."""


def background() -> None:
    """Make the calling thread yield the CPU to the server's requests (and to whatever else
    the machine runs): storing a NAR happens after its upload was answered (:mod:`.spool`),
    so nobody waits for it."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)


_pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="stickyci-nar",
                           initializer=background)


class ChunkStream:
    """A NAR arriving in pieces, normalised (:mod:`.refs`) and cut as it comes; chunks the
    store lacks are compressed in the thread pool meanwhile and added (unflushed) in order.

    Holds at most a step and a chunk of the NAR, and ``IN_FLIGHT`` chunks being compressed:
    memory stays bounded whatever the NAR's size. Not thread-safe: one upload feeds it.
    """

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects
        self.chunks: list[tuple[Digest, int]] = []
        self.patches: list[Patch] = []
        self._buf = bytearray()
        self._base = 0  # offset in the NAR of _buf[0], a chunk boundary
        self._scanned = 0  # _buf is normalised up to here
        self._pending: deque[tuple[int, Future[tuple[Digest, bytes | None]]]] = deque()

    def feed(self, data: bytes) -> None:
        """Take the next bytes of the NAR."""
        self._buf += data
        if len(self._buf) - self._scanned >= STEP:
            self._advance(final=False)

    def finish(self) -> tuple[list[tuple[Digest, int]], tuple[Patch, ...]]:
        """Cut what is left and wait for every chunk to be added: the chunks (digest, length)
        in order, and the patch list."""
        self._advance(final=True)
        while self._pending:
            self._settle()
        return self.chunks, tuple(self.patches)

    def close(self) -> None:
        """Drop what an upload that will not finish left in the pool."""
        for _, job in self._pending:
            job.cancel()
        self._pending.clear()
        self._buf = bytearray()

    def _advance(self, *, final: bool) -> None:
        found, self._scanned = normalise_from(self._buf, self._scanned, final=final)
        self.patches += (Patch(self._base + p.offset, p.name) for p in found)
        # A chunk is final once MAX_SIZE bytes after its start are known: its cut lies in them.
        ready = self._scanned if final else self._scanned - MAX_SIZE
        done = 0
        with memoryview(self._buf)[: self._scanned] as whole:
            for offset, length in _cuts(whole):
                if offset >= ready:
                    break
                piece = bytes(whole[offset : offset + length])
                self._pending.append((len(piece), _pool.submit(_digest_and_encode,
                                                               self.objects, piece)))
                done = offset + length
                if len(self._pending) > IN_FLIGHT:
                    self._settle()
        del self._buf[:done]
        self._base += done
        self._scanned -= done

    def _settle(self) -> None:
        length, job = self._pending.popleft()
        digest, env = job.result()
        if env is not None:
            self.objects.put_envelope(digest, env)
        self.chunks.append((digest, length))


CHUNKER = FastCDC(AVG_SIZE, min_size=MIN_SIZE, max_size=MAX_SIZE)


def _cuts(view: memoryview) -> Iterator[tuple[int, int]]:
    # A pyfastcdc chunk holds a view of the buffer: none may outlive the loop, or the
    # bytearray under it could not shrink.
    for chunk in CHUNKER.cut_buf(view):
        yield chunk.offset, chunk.length


def envelope(plain: bytes) -> bytes:
    """``plain`` in the store's object envelope (:func:`stickyci.codec.encode`), compressed
    again at ``TEXT_LEVEL`` if the default level shrank it below ``TEXT_RATIO``."""
    env = codec.encode(plain)
    if len(env) - codec.HEADER_SIZE < TEXT_RATIO * len(plain):
        env = codec.encode(plain, TEXT_LEVEL)
    return env


def _digest_and_encode(objects: ObjectStore, piece: bytes) -> tuple[Digest, bytes | None]:
    digest = Digest.of(piece)
    return digest, None if objects.has(digest) else envelope(piece)
