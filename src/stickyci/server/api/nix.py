"""The Nix binary cache (``/nix/<cache>/…``): where ``nix copy --to`` uploads, substituters read.

Each cache is a scope for tokens the way a Bazel instance is: a token reads or writes the
caches its patterns match (Nix sends the token as the password of HTTP Basic credentials from
its netrc file). Narinfos are served signed with the cache's own key, whatever the writer
sent; NARs are verified whole before the first byte of one is sent, and served as zstd.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import zstandard
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from ...errors import BackendError, IntegrityError, NotFound, TooLarge, UsageError
from ..auth import Permission
from ..nix import (
    UPLOAD_COMPRESSIONS,
    KeyRing,
    NarInfo,
    NarRecord,
    NarStore,
    check_cache,
    info_name,
    parse_narinfo,
    pin_name,
)
from ..nix.narinfo import HASH_PART, MAX_NARINFO, parse_nix32
from ..state import Api, ServerState

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


class Nix(Api):
    """The handlers of the Nix binary cache."""

    def __init__(self, server: ServerState) -> None:
        super().__init__(server)
        self.keys = KeyRing(server.cfg.state_dir)
        self.nars = NarStore(server.backend)

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
            sent = parse_narinfo(await self._small_body(request), f"narinfo {hash_part}")
            if sent.hash_part != hash_part:
                raise UsageError(f"narinfo {hash_part} describes {sent.path}; PUT it as "
                                 f"{sent.hash_part}.narinfo")
            await self.call(self.keys.ensure, cache)
            await self.call(self.nars.put_info, cache, sent)
            self.server.lru.touch(info_name(cache, hash_part), len(sent.render()))
            await self._evict()
            return Response(status_code=200)
        who.require(Permission.READ, cache, f"Nix cache {cache}")
        info: NarInfo | None = await self.stored(self.nars.info, cache, hash_part)
        if info is None or await self.call(self.backend.stat,
                                           pin_name(cache, info.nar_hash)) is None:
            self.server.metrics.hit("narinfo", False)
            raise NotFound(f"Nix cache {cache} has no narinfo {hash_part}")
        key = await self.call(self.keys.require, cache)
        text = info.render(url=f"nar/{info.nar_name}.nar.zst", compression=SERVED_COMPRESSION,
                           sigs=(key.sign(info.fingerprint()),))
        self.server.metrics.hit("narinfo", True)
        self.server.lru.touch(info_name(cache, hash_part), len(info.render()))
        return Response(text, media_type="text/x-nix-narinfo")

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
        record = None
        if nar_hash is not None:
            record = await self.stored(self.nars.nar, cache, nar_hash)
        if served is None or record is None:
            # Also the answer to nix copy asking for an upload's .xz name before sending it,
            # which is no lookup of a NAR this server serves: not counted as a miss.
            if served is not None:
                self.server.metrics.hit("nar", False)
            raise NotFound(f"Nix cache {cache} has no NAR {file[:120]!r}")
        self.server.metrics.hit("nar", True)
        self.server.lru.touch(pin_name(cache, record.nar_hash), record.size)
        zstd = served.group(2) is not None
        media = "application/x-nix-nar"
        if request.method == "HEAD":
            return Response(media_type=media)
        kept = await self.stored(self.nars.check, record, INLINE_NAR)
        return StreamingResponse(self._send(record, kept, zstd), media_type=media)

    async def _send(self, record: NarRecord, kept: list[bytes] | None,
                    zstd: bool) -> AsyncIterator[bytes]:
        source: Iterator[bytes] = iter(kept) if kept is not None else self.nars.read(record)
        packer = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj() if zstd else None

        def step() -> tuple[bytes, bool]:
            data = next(source, None)
            if data is None:
                return (packer.flush() if packer else b""), True
            return (packer.compress(data) if packer else data), False

        done = False
        while not done:
            out, done = await self.call(step)
            if out:  # compress() may keep what it got for later
                yield out

    async def _put_nar(self, request: Request, cache: str, file: str) -> Response:
        upload = _UPLOAD.fullmatch(file)
        if not upload:
            raise UsageError(f"NAR name {file[:120]!r}: nix copy names a NAR "
                             "nar/<base-32 hash>.nar[.xz|.zst|.bz2]")
        compression = UPLOAD_COMPRESSIONS.get(upload.group(1) or "")
        if compression is None:
            raise UsageError(f"NAR compression {upload.group(1)!r} is not accepted; copy with "
                             "?compression=xz, zstd, bzip2 or none")
        limit = self.server.cfg.max_body
        incoming = await self.call(self.nars.upload, compression, limit)
        try:
            received, buf = 0, bytearray()
            async for piece in request.stream():
                received += len(piece)
                if received > limit:
                    raise TooLarge(f"the NAR upload is over the server's limit of {limit} "
                                   "bytes; raise stickyci serve --max-body")
                buf += piece
                if len(buf) >= _FEED:
                    await self.call(incoming.feed, bytes(buf))
                    buf.clear()
            await self.call(incoming.feed, bytes(buf))
            record = await self.call(self.nars.ingest, cache, incoming)
        except ClientDisconnect as exc:
            raise UsageError("the client went away before the NAR was complete; nothing "
                             "was pinned") from exc
        finally:
            incoming.close()
        self.server.lru.touch(pin_name(cache, record.nar_hash), record.size)
        await self._evict()
        return Response(status_code=200)

    async def stored(self, fn: Callable[..., T], *args: Any) -> T:
        """Read what the server stored: damage there is the server's trouble (a 500 whose
        details stay in its log), not a fault of the request."""
        try:
            return await self.call(fn, *args)
        except IntegrityError as exc:
            raise BackendError(str(exc), summary="the server's store holds damaged data") \
                from exc

    async def _small_body(self, request: Request) -> bytes:
        """A narinfo's body, refused as soon as it passes ``MAX_NARINFO``."""
        buf = bytearray()
        try:
            async for piece in request.stream():
                buf += piece
                if len(buf) > MAX_NARINFO:
                    raise TooLarge(f"a narinfo is at most {MAX_NARINFO} bytes")
        except ClientDisconnect as exc:
            raise UsageError("the client went away before the narinfo was complete") from exc
        return bytes(buf)

    async def _evict(self) -> None:
        """Evict least-recently-used entries once the caches are over ``--max-size``: a
        narinfo (which then reads as missing) or a NAR's pin (whose chunks gc then frees)."""
        for name in self.server.lru.over():
            await self.call(self.backend.delete, name)
            self.server.lru.forget(name)
            self.server.metrics.evictions.labels(name.partition("/")[0]).inc()


def _nar_hash(text: str) -> bytes | None:
    """The SHA-256 a served NAR's name spells, or None if its 52 digits spell none."""
    try:
        return parse_nix32(text, 32)
    except ValueError:
        return None
