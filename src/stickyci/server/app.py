"""The ASGI application behind ``stickyci serve``: the store API and the Bazel HTTP cache.

Every route authenticates first and checks the scope its operation needs, then calls the store
backend in a worker thread (backends block). Errors are ``StickyError``s that one handler turns
into an ``ErrorBody`` and the status ``protocol.status_of`` gives.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .. import disks
from ..disks import gc as gc_
from ..disks import refs
from ..errors import (
    ConflictError,
    Forbidden,
    IntegrityError,
    NotFound,
    StickyError,
    TooLarge,
    UsageError,
)
from ..store import Backend, LocalBackend, open_backend
from ..store import protocol as p
from ..store.backend import check_name
from .auth import ANONYMOUS_READ, Permission, Principal, TokenStore
from .lru import CacheLRU
from .metrics import Metrics, Observe, request_id
from .verify import Verifier
from .visibility import Visibility, covered, redact, sees_everything

log = logging.getLogger("stickyci.server")
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_INSTANCE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
# What the blob API serves. ``ac``/``cas`` belong to the Bazel routes; ``tmp`` holds a file
# backend's unfinished writes, which only garbage collection (admin) may list and delete.
_NAMESPACES = {"packs", "index", "refs", "tmp"}
_IMMUTABLE = {"packs", "index"}
STREAM_CHUNK = 8 << 20
INLINE_READ = 256 << 10
EVICT_EVERY_FLOOR = 1.0
_CLOCK_SKEW = 300.0
"""How far in the future a reader may set a disk's ``last_used`` (runners' clocks differ)."""


@dataclass(frozen=True)
class ServerConfig:
    """How ``stickyci serve`` was started."""

    store_url: str
    state_dir: Path
    max_size: int | None = None
    max_body: int = 2 << 30
    anonymous_read: bool = False
    evict_after: float | None = None
    evict_every: float = 3600.0
    gc_grace: float = gc_.DEFAULT_GRACE


class Server:
    """State shared by the routes: the backend, tokens, cache accounting and metrics."""

    def __init__(self, cfg: ServerConfig, backend: Backend | None = None) -> None:
        self.cfg = cfg
        self.backend = backend or open_backend(cfg.store_url)
        # A file:// store answers a stat and a small read from the page cache faster than a
        # hand-off to a worker thread and back (measured: 2x the small GETs per second).
        self.local_reads = isinstance(self.backend, LocalBackend)
        self.tokens = TokenStore(cfg.state_dir, ANONYMOUS_READ if cfg.anonymous_read else None)
        self.lru = CacheLRU(cfg.max_size)
        self.metrics = Metrics()
        self.visibility = Visibility(self.backend)
        self.verifier = Verifier(self.backend, cfg.state_dir, self.visibility)

    # -- helpers -------------------------------------------------------------------------

    def who(self, request: Request) -> Principal:
        """Authenticate the request; its token id goes to the access log, never the token."""
        principal = self.tokens.authenticate(request.headers.get("authorization"))
        request.state.principal = principal.id
        return principal

    async def body(self, request: Request) -> bytes:
        """The request body, refused with 413 as soon as it passes ``max_body``."""
        limit = self.cfg.max_body
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise TooLarge(f"request body of {declared} bytes is over the server's limit of "
                           f"{limit}; raise stickyci serve --max-body")
        buf = bytearray()
        try:
            async for chunk in request.stream():
                buf += chunk
                if len(buf) > limit:
                    raise TooLarge(f"request body is over the server's limit of {limit} "
                                   "bytes; raise stickyci serve --max-body")
        except ClientDisconnect as exc:
            raise UsageError("the client went away before the body was complete; "
                             "nothing was stored") from exc
        return bytes(buf)

    async def hash_check(self, fn: Callable[[], T], size: int) -> T:
        """Hash a body: inline when small, in a thread when big, so a 16 MiB pack does not
        stall every other request while it is hashed."""
        return fn() if size <= INLINE_READ else await self.call(fn)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking backend call off the event loop."""
        return await run_in_threadpool(fn, *args)

    # -- the store API ---------------------------------------------------------------------

    async def blob(self, request: Request) -> Response:
        """GET / HEAD / PUT / DELETE one blob of the store."""
        name = request.path_params["name"]
        ns, key = _blob_scope(name)
        who = self.who(request)
        method = request.method
        if method in ("GET", "HEAD"):
            # tmp holds other writers' unfinished uploads: only gc (admin) looks at them.
            who.require(Permission.ADMIN if ns == "tmp" else Permission.READ, key, name)
            if method == "HEAD":
                st = await self.call(self.backend.stat, name)
                if st is None:
                    raise NotFound(f"store object {name} is missing")
                return Response(headers={"content-length": str(st.size),
                                         p.MTIME_HEADER: repr(st.mtime)})
            offset, length = _parse_range(request.headers.get("range"))
            if ns in _IMMUTABLE and not sees_everything(who):
                response, size = await self.send_view(who, ns, name, offset, length)
            else:
                response, size = await self.send_blob(name, offset, length)
            if length is not None or offset:
                response.status_code = 206
                response.headers["content-range"] = f"bytes {offset}-{offset + size - 1}/*"
            return response
        if method == "DELETE":
            perm = Permission.DELETE if key is not None else Permission.ADMIN
            who.require(perm, key, name)
            await self.call(self.backend.delete, name)
            if key is not None:
                self.visibility.refs.drop(key)
            return Response(status_code=204)
        if (ns == "refs" and not who.scope.allows(Permission.WRITE, key)
                and who.scope.allows(Permission.READ, key)):
            return await self.touch(request, name, key, who)
        who.require(Permission.WRITE, key, name)
        if ns == "tmp":
            raise UsageError(f"{name}: the tmp namespace is the server's own; write elsewhere")
        data = await self.body(request)
        if_match = request.headers.get("if-match")
        if_none = request.headers.get("if-none-match")
        if ns in _IMMUTABLE:
            if if_match is not None or if_none is not None:
                # A condition must be no way around immutability: a name that is taken keeps
                # its bytes, whatever etag the writer read.
                raise UsageError(f"{name} is immutable: PUT it without If-Match or "
                                 "If-None-Match")
            await self.store_immutable(who, ns, name, data)
            return Response(status_code=204)
        if if_none not in (None, "*"):
            raise UsageError("If-None-Match supports only '*' (create if absent); use "
                             "If-Match ETAG to replace a known version")
        assert key is not None
        ref = None
        if not who.scope.admin:  # an admin is trusted with the store; every other writer not
            current = await self.call(self.backend.read_versioned, name)
            ref = await self.call(self.verifier.check_ref, who, key, data,
                                  current[0] if current else None)
        if if_match is not None or if_none == "*":
            won = await self.call(self.backend.put_if, name, data, if_match)
            if not won:
                return await self.lost_race(name)
        else:
            await self.call(self.backend.put, name, data)
        if ref is None:  # an admin's ref, stored unchecked: it grants reads only if it parses
            with contextlib.suppress(StickyError):
                ref = refs.DiskRef.decode(data, key)
        if ref is not None:
            self.visibility.refs.put(key, ref)
        else:
            self.visibility.refs.drop(key)
        return Response(status_code=204)

    async def store_immutable(self, who: Principal, ns: str, name: str, data: bytes) -> None:
        """Store a pack or an index once verified; an existing name takes only its own bytes
        again (a retried upload), so nothing immutable is ever replaced."""
        ident = name.partition("/")[2]
        if ns == "packs":
            # Hashing to the name makes a re-upload byte-identical to what is stored.
            await self.hash_check(functools.partial(self.verifier.check_pack, name, data),
                                  len(data))
            if await self.call(self.backend.stat, name) is None:
                await self.call(self.backend.put, name, data)
            self.verifier.pack_stored(who, ident, data)
            return
        if not await self.call(self.verifier.check_same, name, data):
            trusted = who.scope.admin
            entries = await self.hash_check(
                functools.partial(self.verifier.check_index, name, data, trusted),
                len(data) if trusted else INLINE_READ + 1)
            # Two verified indexes of one pack are equal (an index describes its pack
            # exactly), so two uploads racing past check_same store the same bytes.
            await self.call(self.backend.put, name, data)
            self.visibility.remember_index(ident, entries)
        await self.call(self.verifier.index_stored, who, ident)  # may append to a log file

    async def touch(self, request: Request, name: str, key: str | None,
                    who: Principal) -> Response:
        """A reader's ref update, allowed when it only moves ``last_used``: a mount records
        that it used the disk, so eviction keeps what read-only jobs (pull requests) use."""
        data = await self.body(request)
        if_match = request.headers.get("if-match")
        current = await self.call(self.backend.read_versioned, name)
        if not (current and if_match == current[1] and _only_touches(current[0], data)):
            who.require(Permission.WRITE, key, name)
        # Against the etag of the ref just checked, so what lands is that ref, touched.
        if not await self.call(self.backend.put_if, name, data, if_match):
            return await self.lost_race(name)
        return Response(status_code=204)

    async def send_view(self, who: Principal, ns: str, name: str, offset: int,
                        length: int | None) -> tuple[Response, int]:
        """A pack or index as a filtered token may see it: an index lists only the objects it
        may read (a partial index); a pack has every other byte zeroed. What it may read in
        full is served as stored."""
        ident = name.partition("/")[2]
        if ns == "index":
            # What was worked out for this token before is at hand without a thread hop.
            memo = self.visibility.memo(who)
            if memo is not None and ident in memo.indexes:
                view = memo.indexes[ident]
            else:
                view = await self.call(self.visibility.index_view, who, ident)
            if view is None:
                return await self.send_blob(name, offset, length)
            end = len(view) if length is None else min(len(view), offset + length)
            return Response(view[offset:end], media_type="application/octet-stream",
                            headers={p.VIEW_HEADER: "partial"}), max(0, end - offset)
        memo = self.visibility.memo(who)
        if memo is not None and ident in memo.spans:
            spans: list[tuple[int, int]] | None = memo.spans[ident]
        else:
            spans = await self.call(self.visibility.pack_spans, who, ident)
        if spans is not None and length is not None and covered(spans, offset, offset + length):
            # A range of visible objects (a runner reading one object): no stat needed.
            return await self.send_blob(name, offset, length)
        st = await self.call(self.backend.stat, name)
        if st is None:
            raise NotFound(f"store object {name} is missing")
        end = st.size if length is None else min(st.size, offset + length)
        if spans is None or covered(spans, offset, end):
            return await self.send_blob(name, offset, length)
        headers = {p.VIEW_HEADER: "redacted"}
        if end - offset <= STREAM_CHUNK:
            data = await self.call(self.backend.get, name, offset, max(0, end - offset))
            shown = await self.hash_check(functools.partial(redact, data, offset, spans),
                                          len(data))
            return Response(shown, media_type="application/octet-stream",
                            headers=headers), len(shown)

        async def chunks() -> AsyncIterator[bytes]:  # bounded memory, as send_blob
            for pos in range(offset, end, STREAM_CHUNK):
                piece = await self.call(self.backend.get, name, pos, min(STREAM_CHUNK, end - pos))
                yield await self.call(redact, piece, pos, spans)

        headers["content-length"] = str(end - offset)
        return StreamingResponse(chunks(), media_type="application/octet-stream",
                                 headers=headers), end - offset

    async def send_blob(self, name: str, offset: int = 0,
                        length: int | None = None) -> tuple[Response, int]:
        """A response carrying a blob (or a range of it), and its size. A blob over
        ``STREAM_CHUNK`` is sent in chunks of that size, so memory stays bounded however
        large the blob and however many clients download at once."""
        got: bytes | int = -1
        if self.local_reads:
            got = self._small_or_end(name, offset, length, INLINE_READ)
        if not isinstance(got, bytes):
            got = await self.call(self._small_or_end, name, offset, length, STREAM_CHUNK)
        if isinstance(got, bytes):
            return Response(got, media_type="application/octet-stream"), len(got)

        async def chunks() -> AsyncIterator[bytes]:
            for pos in range(offset, got, STREAM_CHUNK):
                yield await self.call(self.backend.get, name, pos, min(STREAM_CHUNK, got - pos))

        return StreamingResponse(chunks(), media_type="application/octet-stream",
                                 headers={"content-length": str(got - offset)}), got - offset

    def _small_or_end(self, name: str, offset: int, length: int | None,
                      most: int) -> bytes | int:
        """The bytes asked for if they are at most ``most``, else where they end."""
        if length is None or length > most:
            st = self.backend.stat(name)
            if st is None:
                raise NotFound(f"store object {name} is missing")
            end = st.size if length is None else min(st.size, offset + length)
            if end - offset > most:
                return end
        return self.backend.get(name, offset, length)

    async def lost_race(self, name: str) -> Response:
        """409 with the etag that won, and for a disk ref the generation it points to."""
        current = await self.call(self.backend.read_versioned, name)
        etag = current[1] if current else None
        generation = None
        if current and name.startswith("refs/"):
            # Only a hint: a ref that is not a disk's JSON must not turn the 409 into a 500.
            with contextlib.suppress(StickyError):
                latest = refs.DiskRef.decode(current[0]).latest
                generation = latest.gen if latest else None
        body = p.ErrorBody(error=f"{name} changed since it was read; re-read and retry",
                           kind=ConflictError.__name__, etag=etag, generation=generation)
        return Response(body.model_dump_json(), status_code=409, media_type="application/json")

    async def versioned(self, request: Request) -> Response:
        """A blob with its etag, for compare-and-swap updates."""
        name = request.path_params["name"]
        ns, key = _blob_scope(name)
        who = self.who(request)
        who.require(Permission.READ, key, name)
        if ns in _IMMUTABLE and not sees_everything(who):
            raise Forbidden(f"token {who.id} may read {name} only through GET "
                            f"{p.PREFIX}/blobs/{name}, which shows what its scope covers")
        got = await self.call(self.backend.read_versioned, name)
        if got is None:
            raise NotFound(f"store object {name} is missing")
        return Response(got[0], media_type="application/octet-stream",
                        headers={"etag": got[1]})

    async def listing(self, request: Request) -> Response:
        """Names in a namespace; refs are filtered to the keys the token may read."""
        ns = request.path_params["namespace"]
        if ns not in _NAMESPACES:
            raise UsageError(f"namespace {ns!r} is not served; use one of "
                             f"{', '.join(sorted(_NAMESPACES))}")
        who = self.who(request)
        if ns == "tmp":
            who.require(Permission.ADMIN, None, "the tmp namespace")
        else:
            who.require(Permission.READ, None, f"the {ns} namespace")
        names = await self.call(self.backend.list, ns)
        if ns == "refs":
            names = [n for n in names if who.scope.allows(Permission.READ, n[5:])]
        return _json(p.ListResponse(names=names))

    async def missing(self, request: Request) -> Response:
        """Which of a batch of content-addressed blobs the store lacks."""
        who = self.who(request)
        req = _parse(p.MissingRequest, await self.body(request))
        for name in req.names:
            if _blob_scope(name)[0] not in _IMMUTABLE:
                raise UsageError(f"{name}: /v1/missing answers for packs and index only")
        who.require(Permission.READ, None, "the store's objects")

        def check() -> list[str]:
            return [n for n in req.names if self.backend.stat(n) is None]

        return _json(p.MissingResponse(missing=await self.call(check)))

    async def disk_list(self, request: Request) -> Response:
        """Disks the token may read, as ``disk ls --json`` shows them."""
        who = self.who(request)
        found = await self.call(disks.list_disks, self.backend)
        return _json(p.DisksResponse(
            disks=[d for d in found if who.scope.allows(Permission.READ, d["key"])]))

    async def disk_show(self, request: Request) -> Response:
        """One disk's metadata and generations."""
        key = refs.check_key(request.path_params["key"])
        self.who(request).require(Permission.READ, key, f"disk {key}")
        return JSONResponse(await self.call(disks.show, key, self.backend))

    async def evict(self, request: Request) -> Response:
        """Remove disks unused for a TTL (admin)."""
        self.who(request).require(Permission.ADMIN, None, "disk eviction")
        req = _parse(p.EvictRequest, await self.body(request))
        result = await self.call(self.evict_disks, req.ttl, req.dry_run)
        return _json(p.EvictResponse(result=result))

    def evict_disks(self, ttl: float, dry_run: bool = False) -> dict[str, Any]:
        """Disk TTL eviction, counted in the metrics."""
        result = disks.evict(ttl, dry_run=dry_run, store=self.backend)
        self.visibility.refs.invalidate()
        if not dry_run:
            self.metrics.evictions.labels("disk").inc(len(result["evicted"]))
        return result

    # -- the Bazel HTTP cache --------------------------------------------------------------

    async def bazel(self, request: Request) -> Response:
        """``GET|HEAD|PUT [/instance]/ac|cas/<sha256>``; CAS uploads must hash to their name."""
        kind = "cas" if "/cas/" in request.scope["path"] else "ac"  # request.url is costly
        digest = request.path_params["digest"]
        instance = request.path_params.get("instance", "default")
        if not _SHA256.match(digest):
            raise UsageError(f"{digest!r} is not a SHA-256 digest (64 lowercase hex digits)")
        if not _INSTANCE.match(instance):
            raise UsageError(f"instance name {instance!r}: use letters, digits, '_' and '-'")
        who = self.who(request)
        # CAS entries are content-addressed and shared by every instance; AC entries are not.
        name = f"cas/{digest}" if kind == "cas" else f"ac/{instance}.{digest}"
        if request.method == "PUT":
            who.require(Permission.WRITE, instance, f"the {instance} cache")
            data = await self.body(request)
            if kind == "cas" and await self.hash_check(
                    functools.partial(_sha256, data), len(data)) != digest:
                raise IntegrityError(f"CAS upload does not hash to {digest}; nothing stored")
            await self.call(self.backend.put, name, data)
            self.lru.touch(name, len(data))
            await self.enforce_max_size()
            return Response(status_code=200)
        who.require(Permission.READ, instance, f"the {instance} cache")
        try:
            if request.method == "HEAD":
                st = await self.call(self.backend.stat, name)
                if st is None:
                    raise NotFound(f"{kind} entry {digest} is not in the cache")
                size = st.size
                response = Response(headers={"content-length": str(size)})
            else:
                response, size = await self.send_blob(name)
        except NotFound:
            self.metrics.hit(kind, False)
            self.lru.forget(name)
            raise
        self.metrics.hit(kind, True)
        self.lru.touch(name, size)
        return response

    async def enforce_max_size(self) -> None:
        """Evict least-recently-used cache entries once the cache is over ``--max-size``."""
        victims = self.lru.over()
        for name in victims:
            await self.call(self.backend.delete, name)
            self.lru.forget(name)
            self.metrics.evictions.labels(name.partition("/")[0]).inc()

    # -- operations ------------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        """Up, and the store answers a listing."""
        await self.call(self.backend.stat, "refs/healthz")
        scheme = urlparse(self.backend.url).scheme or "file"
        return _json(p.Health(status="ok", store=scheme))

    async def metrics_page(self, request: Request) -> Response:
        """Prometheus exposition."""
        return Response(self.metrics.render(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """Seed the cache accounting, and run disk eviction on its schedule."""
        tasks = []
        if self.cfg.max_size is not None:
            await self.call(self.lru.seed, self.backend)
        if self.cfg.evict_after:
            tasks.append(asyncio.create_task(self._evict_loop(self.cfg.evict_after)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()

    async def _evict_loop(self, ttl: float) -> None:
        # Eviction only drops refs; the gc after it reclaims their objects (and those of disks
        # removed by hand). gc spares packs younger than its grace, so commits in flight on
        # runners are safe, and a commit re-checks its packs before it moves a ref.
        while True:
            try:
                result = await self.call(self.evict_disks, ttl)
                if result["evicted"]:
                    log.info("evicted disks unused for %ss: %s", ttl, result["evicted"])
                report = await self.call(
                    functools.partial(gc_.gc, self.cfg.store_url, grace=self.cfg.gc_grace))
                log.info("gc freed %d bytes", report.bytes_freed)
            except StickyError as exc:
                log.warning("scheduled disk eviction failed: %s", exc)
            except Exception:  # a bug must not end the schedule: log it, try next time
                log.exception("scheduled disk eviction failed unexpectedly; trying again in "
                              "%ss", self.cfg.evict_every)
            # A period of 0 would spin the event loop; the CLI refuses one, a caller may not.
            await asyncio.sleep(max(self.cfg.evict_every, EVICT_EVERY_FLOOR))


def _parse(model: type[M], data: bytes) -> M:
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "body"
        raise UsageError(f"invalid request body: {where}: {first['msg']}") from exc


def _json(model: BaseModel) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


def _blob_scope(name: str) -> tuple[str, str | None]:
    """A served blob name's namespace and, for a ref, the disk key scopes are matched on."""
    check_name(name)
    ns, _, rest = name.partition("/")
    if ns not in _NAMESPACES:
        raise UsageError(f"{name}: namespace {ns!r} is not served by the blob API")
    return ns, (refs.check_key(rest) if ns == "refs" else None)


def _only_touches(old: bytes, new: bytes) -> bool:
    """Whether ref ``new`` is ``old`` with a later ``last_used`` (not in the future) and
    nothing else changed."""
    try:
        a, b = refs.DiskRef.decode(old), refs.DiskRef.decode(new)
        return ((b.key, b.created, b.generations) == (a.key, a.created, a.generations)
                and a.last_used <= b.last_used <= time.time() + _CLOCK_SKEW)
    except (StickyError, TypeError):  # TypeError: a field of the wrong type
        return False


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _parse_range(header: str | None) -> tuple[int, int | None]:
    if header is None:
        return 0, None
    m = _RANGE.match(header.strip())
    if not m:
        raise UsageError(f"unsupported Range {header!r}: use bytes=START-END or bytes=START-")
    start = int(m.group(1))
    if not m.group(2):
        return start, None
    end = int(m.group(2))
    if end < start:
        raise UsageError(f"invalid Range {header!r}: END is before START")
    return start, end - start + 1


def _error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StickyError)
    status = p.status_of(exc)
    rid = request_id(request.scope)
    if status >= 500:
        # The server's own trouble: its message names endpoints, buckets and paths, which are
        # the operator's business. The log keeps it; the client gets its kind and the id.
        log.warning("request %s: %s %r: %s", rid, request.method, request.url.path, exc)
        message = f"{exc.summary}; the server log has details under request id {rid}"
    else:
        message = str(exc)  # about the client's own request: the specifics help it
    body = p.ErrorBody(error=message, kind=p.kind_of(exc), request_id=rid)
    headers = {"www-authenticate": 'Bearer realm="stickyci"'} if status == 401 else None
    return Response(body.model_dump_json(), status_code=status, media_type="application/json",
                    headers=headers)


def create_app(cfg: ServerConfig, backend: Backend | None = None) -> Observe:
    """The server as an ASGI app, wrapped in metrics and access logging."""
    server = Server(cfg, backend)
    bazel_methods = ["GET", "HEAD", "PUT"]
    routes = [
        Route("/healthz", server.healthz, methods=["GET"]),
        Route("/metrics", server.metrics_page, methods=["GET"]),
        Route(f"{p.PREFIX}/blobs/{{name:path}}", server.blob,
              methods=["GET", "HEAD", "PUT", "DELETE"]),
        Route(f"{p.PREFIX}/versioned/{{name:path}}", server.versioned, methods=["GET"]),
        Route(f"{p.PREFIX}/list/{{namespace}}", server.listing, methods=["GET"]),
        Route(f"{p.PREFIX}/missing", server.missing, methods=["POST"]),
        Route(f"{p.PREFIX}/disks", server.disk_list, methods=["GET"]),
        Route(f"{p.PREFIX}/disks/{{key}}", server.disk_show, methods=["GET"]),
        Route(f"{p.PREFIX}/evict", server.evict, methods=["POST"]),
        Route("/ac/{digest}", server.bazel, methods=bazel_methods),
        Route("/cas/{digest}", server.bazel, methods=bazel_methods),
        Route("/{instance}/ac/{digest}", server.bazel, methods=bazel_methods),
        Route("/{instance}/cas/{digest}", server.bazel, methods=bazel_methods),
    ]
    app = Starlette(routes=routes, exception_handlers={StickyError: _error},
                    lifespan=server.lifespan)
    app.state.server = server
    return Observe(app, server.metrics)
