"""The Nix binary cache (``/nix/<cache>/…``): where ``nix copy --to`` uploads, substituters read.

Each cache is a scope for tokens the way a Bazel instance is: a token reads or writes the
caches its patterns match (Nix sends the token as the password of HTTP Basic credentials from
its netrc file). Narinfos are served signed with the cache's own key, whatever the writer
sent; NARs are verified whole before the first byte of one is sent, and served as zstd.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any, TypeVar

import zstandard
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from ...errors import BackendError, IntegrityError, NotFound, UsageError
from ..auth import Permission
from ..nix import (
    UPLOAD_COMPRESSIONS,
    KeyRing,
    NarInfo,
    NarStore,
    NarUpload,
    Spool,
    check_cache,
    checked,
    info_name,
    parse_narinfo,
    pin_name,
)
from ..nix.narinfo import HASH_PART, MAX_NARINFO, parse_nix32
from ..state import MAX_BODY_HINT, Api, ServerState, body_pieces, read_limited

CACHE_INFO = "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n"
SERVED_COMPRESSION = "zstd"
ZSTD_LEVEL = 3
INLINE_NAR = 32 << 20
"""NARs up to this size are kept in memory between their check and their sending; larger ones
are read twice (checked whole first, then streamed), so memory stays bounded."""
_FEED = 1 << 20
_NAR32 = "[0-9a-df-np-sv-z]{52}"
_UPLOAD = re.compile(rf"{_NAR32}\.nar(\.[a-z0-9]+)?")
_SERVED = re.compile(rf"({_NAR32})\.nar(\.zst)?")
_METHODS = ["GET", "HEAD", "PUT"]
T = TypeVar("T")


def routes(server: ServerState) -> list[Route]:
    """The Nix binary cache's routes."""
    api = Nix(server)
    return [Route("/nix/{cache}/nar/{file}", api.nar, methods=_METHODS),
            Route("/nix/{cache}/{file}", api.top, methods=_METHODS)]


Handler = Callable[["Nix", Request], Awaitable[Response]]


def _serving(handler: Handler) -> Handler:
    """A handler during which the spool's ingester waits (:meth:`Spool.serving`)."""

    @functools.wraps(handler)
    async def serve(api: Nix, request: Request) -> Response:
        with api.spool.serving():
            return await handler(api, request)

    return serve


class Nix(Api):
    """The handlers of the Nix binary cache."""

    def __init__(self, server: ServerState) -> None:
        super().__init__(server)
        self.keys = KeyRing(server.cfg.state_dir)
        self.nars = NarStore(server.backend)
        self.spool = Spool(server.cfg.state_dir, self._ingest)
        server.metrics.add_collector(_Backlog(self.spool))

    def _ingest(self, cache: str, nar_hash: bytes, spooled: IO[bytes]) -> None:
        """Take a spooled NAR into the store (the spool's ingester thread)."""
        self.nars.ingest(cache, self.spool.paced(_pieces(spooled)), nar_hash)
        # Counted again now that its pin exists: an eviction while it was spooled found no
        # pin to delete, and would otherwise leave it stored but out of the accounting.
        self.server.lru.touch(pin_name(cache, nar_hash), os.fstat(spooled.fileno()).st_size)

    @_serving
    async def top(self, request: Request) -> Response:
        """``nix-cache-info`` and ``<hash>.narinfo``."""
        cache = check_cache(request.path_params["cache"])
        file = request.path_params["file"]
        who = self.who(request)
        if file == "nix-cache-info":
            if request.method == "PUT":
                who.require(Permission.WRITE, cache, f"Nix cache {cache}")
                return Response(status_code=200)  # the server says what the cache is
            who.require(Permission.READ, cache, f"Nix cache {cache}")
            return Response(CACHE_INFO, media_type="text/x-nix-cache-info")
        hash_part = file.removesuffix(".narinfo")
        if not HASH_PART.fullmatch(hash_part) or hash_part == file:
            raise NotFound(f"Nix cache {cache} has no {file[:120]!r}; it serves "
                           "nix-cache-info, <hash>.narinfo and nar/")
        if request.method == "PUT":
            who.require(Permission.WRITE, cache, f"Nix cache {cache}")
            sent = parse_narinfo(await read_limited(request, MAX_NARINFO, "a narinfo"),
                                 f"narinfo {hash_part}")
            if sent.hash_part != hash_part:
                raise UsageError(f"narinfo {hash_part} describes {sent.path}; PUT it as "
                                 f"{sent.hash_part}.narinfo")
            await self.call(self.keys.ensure, cache)
            await self.call(self.nars.put_info, cache, sent,
                            await self.call(self.spool.size, cache, sent.nar_hash))
            self.server.lru.touch(info_name(cache, hash_part), len(sent.render()))
            await self._evict()
            return Response(status_code=200)
        who.require(Permission.READ, cache, f"Nix cache {cache}")
        info: NarInfo | None = await self.stored(self.nars.info, cache, hash_part)
        if info is None or not await self.call(self._has_nar, cache, info.nar_hash):
            self.server.metrics.hit("narinfo", False)
            raise NotFound(f"Nix cache {cache} has no narinfo {hash_part}")
        key = await self.call(self.keys.require, cache)
        text = info.render(url=f"nar/{info.nar_name}.nar.zst", compression=SERVED_COMPRESSION,
                           sigs=(key.sign(info.fingerprint()),))
        self.server.metrics.hit("narinfo", True)
        self.server.lru.touch(info_name(cache, hash_part), len(info.render()))
        return Response(text, media_type="text/x-nix-narinfo")

    @_serving
    async def nar(self, request: Request) -> Response:
        """``nar/<nar hash>.nar[.zst]``: a NAR, checked whole before it is sent."""
        cache = check_cache(request.path_params["cache"])
        file = request.path_params["file"]
        who = self.who(request)
        if request.method == "PUT":
            who.require(Permission.WRITE, cache, f"Nix cache {cache}")
            return await self._put_nar(request, cache, file)
        who.require(Permission.READ, cache, f"Nix cache {cache}")
        served = _SERVED.fullmatch(file)
        nar_hash = _nar_hash(served.group(1)) if served else None
        nar = await self._locate(cache, nar_hash) if nar_hash is not None else None
        if served is None or nar_hash is None or nar is None:
            # Also the answer to nix copy asking for an upload's .xz name before sending it,
            # which is no lookup of a NAR this server serves: not counted as a miss.
            if served is not None:
                self.server.metrics.hit("nar", False)
            raise NotFound(f"Nix cache {cache} has no NAR {file[:120]!r}")
        media = "application/x-nix-nar"
        try:
            self.server.metrics.hit("nar", True)
            self.server.lru.touch(pin_name(cache, nar_hash), nar.size)
            if request.method == "HEAD":
                nar.close()
                return Response(media_type=media)
            kept = await self.stored(checked, nar.read(), nar_hash, nar.size, INLINE_NAR)
        except BaseException:
            nar.close()
            raise
        return StreamingResponse(self._send(nar, kept, served.group(2) is not None),
                                 media_type=media)

    async def _locate(self, cache: str, nar_hash: bytes) -> _Nar | None:
        """The cache's NAR with this hash: from the store, or from the spool while it waits
        there; None if it has none."""
        record = await self.stored(self.nars.nar, cache, nar_hash)
        if record is not None:
            return _Nar(record.size, lambda: self.nars.read(record))
        spooled = await self.call(self.spool.open, cache, nar_hash)
        if spooled is None:
            return None
        return _Nar(os.fstat(spooled.fileno()).st_size, lambda: _pieces(spooled, rewind=True),
                    spooled.close)

    def _has_nar(self, cache: str, nar_hash: bytes) -> bool:
        return self.nars.pinned(cache, nar_hash) or self.spool.size(cache, nar_hash) is not None

    async def _send(self, nar: _Nar, kept: list[bytes] | None,
                    zstd: bool) -> AsyncIterator[bytes]:
        pieces: Iterator[bytes] = iter(kept) if kept is not None else nar.read()
        packer = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj() if zstd else None

        def step() -> tuple[bytes, bool]:
            data = next(pieces, None)
            if data is None:
                return (packer.flush() if packer else b""), True
            return (packer.compress(data) if packer else data), False

        try:
            done = False
            while not done:
                out, done = await self.call(step)
                if out:  # compress() may keep what it got for later
                    yield out
        finally:
            nar.close()

    async def _put_nar(self, request: Request, cache: str, file: str) -> Response:
        upload = _UPLOAD.fullmatch(file)
        if not upload:
            raise UsageError(f"NAR name {file[:120]!r}: nix copy names a NAR "
                             "nar/<base-32 hash>.nar[.xz|.zst|.bz2]")
        compression = UPLOAD_COMPRESSIONS.get(upload.group(1) or "")
        if compression is None:
            raise UsageError(f"NAR compression {upload.group(1)!r} is not accepted; copy with "
                             "?compression=xz, zstd, bzip2 or none")
        part = await self.call(self.spool.begin)
        incoming = NarUpload(compression, self.server.cfg.max_body, part.write)
        kept = False
        try:
            await self._receive(request, incoming)
            nar_hash, size = await self.call(incoming.finish)
            if not await self.call(self._has_nar, cache, nar_hash):
                await self.call(self.spool.keep, part, cache, nar_hash)
                kept = True
        finally:
            if not kept:
                await self.call(part.drop)
        self.server.lru.touch(pin_name(cache, nar_hash), size)
        await self._evict()
        return Response(status_code=200)

    async def _receive(self, request: Request, incoming: NarUpload) -> None:
        """Feed the upload to ``incoming`` a MiB at a time: the next MiB arrives while a thread
        decompresses, hashes and writes the last one, so Nix waits for the slower of the two,
        not for both."""
        held, pieces = 0, []
        feeding: asyncio.Task[None] | None = None
        try:
            async for piece in body_pieces(request, self.server.cfg.max_body, "the NAR upload",
                                           MAX_BODY_HINT):
                pieces.append(piece)
                held += len(piece)
                if held >= _FEED:
                    if feeding is not None:
                        await feeding
                    # Joined once: the event loop is what receiving waits for.
                    feeding = asyncio.ensure_future(self.call(incoming.feed, b"".join(pieces)))
                    pieces, held = [], 0
            if feeding is not None:
                await feeding
            await self.call(incoming.feed, b"".join(pieces))
        finally:
            if feeding is not None:
                # On a failure the thread must be done with the spool file before it goes.
                await asyncio.wait([feeding])
                if not feeding.cancelled():
                    feeding.exception()  # retrieved: the error raised here is the one to tell

    async def stored(self, fn: Callable[..., T], *args: Any) -> T:
        """Read what the server stored: damage there is the server's trouble (a 500 whose
        details stay in its log), not a fault of the request."""
        try:
            return await self.call(fn, *args)
        except IntegrityError as exc:
            raise BackendError(str(exc), summary="the server's store holds damaged data") \
                from exc

    async def _evict(self) -> None:
        """Evict least-recently-used entries once the caches are over ``--max-size``: a
        narinfo (which then reads as missing) or a NAR's pin (whose chunks gc then frees)."""
        for name in self.server.lru.over():
            await self.call(self.backend.delete, name)
            self.server.lru.forget(name)
            self.server.metrics.evictions.labels(name.partition("/")[0]).inc()


class _Backlog(Collector):
    """The spool's backlog at each scrape: NARs answered but not yet in the store."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool

    def collect(self) -> Iterator[Metric]:
        count, size = self.spool.backlog()
        yield GaugeMetricFamily("stickyci_nix_spool_nars", "Nix NARs answered and waiting in "
                                "the spool to be stored", value=count)
        yield GaugeMetricFamily("stickyci_nix_spool_bytes", "Bytes of the NARs waiting in "
                                "the spool", value=size)


@dataclass(frozen=True, slots=True)
class _Nar:
    """A NAR to send: its size, a fresh read of its bytes, and what to close once sent."""

    size: int
    read: Callable[[], Iterator[bytes]]
    close: Callable[[], None] = lambda: None


def _pieces(f: IO[bytes], rewind: bool = False) -> Iterator[bytes]:
    """A file's bytes a MiB at a time (from its start if ``rewind``)."""
    if rewind:
        f.seek(0)
    while piece := f.read(_FEED):
        yield piece


def _nar_hash(text: str) -> bytes | None:
    """The SHA-256 a served NAR's name spells, or None if its 52 digits spell none."""
    try:
        return parse_nix32(text, 32)
    except ValueError:
        return None
