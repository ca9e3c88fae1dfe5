"""The store API (``/v1/blobs``, ``/v1/versioned``, ``/v1/list``, ``/v1/missing``): the
backend interface over HTTP, as ``store/http.py`` calls it.

Packs and indexes are immutable and verified before they are stored; refs change by
compare-and-swap and are checked against what the writer's token may do.
"""

from __future__ import annotations

import contextlib
import functools
import re
import time
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from ...disks import DiskRef, check_key
from ...errors import ConflictError, Forbidden, NotFound, StickyError, UsageError
from ...store import check_name
from ...store import protocol as p
from ..auth import Permission, Principal
from ..state import INLINE_READ, STREAM_CHUNK, Api, ServerState, json_response, parse_body
from ..visibility import covered, redact, sees_everything

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
# What the blob API serves. ``ac``/``cas`` belong to the Bazel routes. The server's own
# namespaces are for garbage collection (admin) to read, never for a client to write: ``tmp``
# holds a file backend's unfinished writes, ``roots`` the snapshots the server's caches (Nix,
# GitHub Actions) keep live.
_NAMESPACES = {"packs", "index", "refs", "tmp", "roots"}
_SERVERS_OWN = {"tmp", "roots"}
_IMMUTABLE = {"packs", "index"}
_CLOCK_SKEW = 300.0
"""How far in the future a reader may set a disk's ``last_used`` (runners' clocks differ)."""


def routes(server: ServerState) -> list[Route]:
    """The store API's routes."""
    api = Blobs(server)
    return [
        Route(f"{p.PREFIX}/blobs/{{name:path}}", api.blob,
              methods=["GET", "HEAD", "PUT", "DELETE"]),
        Route(f"{p.PREFIX}/versioned/{{name:path}}", api.versioned, methods=["GET"]),
        Route(f"{p.PREFIX}/list/{{namespace}}", api.listing, methods=["GET"]),
        Route(f"{p.PREFIX}/missing", api.missing, methods=["POST"]),
    ]


class Blobs(Api):
    """The handlers of the store API."""

    async def blob(self, request: Request) -> Response:
        """GET / HEAD / PUT / DELETE one blob of the store."""
        name = request.path_params["name"]
        ns, key = _blob_scope(name)
        who = self.who(request)
        method = request.method
        if method in ("GET", "HEAD"):
            return await self.read(request, who, ns, key, name)
        if method == "DELETE":
            perm = Permission.DELETE if key is not None else Permission.ADMIN
            who.require(perm, key, name)
            await self.call(self.backend.delete, name)
            if key is not None:
                self.server.visibility.refs.drop(key)
                self.server.refs_changed()
            return Response(status_code=204)
        if (ns == "refs" and not who.scope.allows(Permission.WRITE, key)
                and who.scope.allows(Permission.READ, key)):
            return await self.touch(request, name, key, who)
        who.require(Permission.WRITE, key, name)
        if ns in _SERVERS_OWN:
            raise UsageError(f"{name}: the {ns} namespace is the server's own; write elsewhere")
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
            ref = await self.call(self.server.verifier.check_ref, who, key, data,
                                  current[0] if current else None)
        if if_match is not None or if_none == "*":
            won = await self.call(self.backend.put_if, name, data, if_match)
            if not won:
                return await self.lost_race(name)
        else:
            await self.call(self.backend.put, name, data)
        if ref is None:  # an admin's ref, stored unchecked: it grants reads only if it parses
            with contextlib.suppress(StickyError):
                ref = DiskRef.decode(data, key)
        if ref is not None:
            self.server.visibility.refs.put(key, ref)
        else:
            self.server.visibility.refs.drop(key)
        self.server.refs_changed()
        return Response(status_code=204)

    async def read(self, request: Request, who: Principal, ns: str, key: str | None,
                   name: str) -> Response:
        """GET (a range, or a filtered token's view of a pack or index) or HEAD one blob."""
        # Other writers' unfinished uploads, the caches' roots: only gc (admin) looks at them.
        who.require(Permission.ADMIN if ns in _SERVERS_OWN else Permission.READ, key, name)
        if request.method == "HEAD":
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

    async def store_immutable(self, who: Principal, ns: str, name: str, data: bytes) -> None:
        """Store a pack or an index once verified; an existing name takes only its own bytes
        again (a retried upload), so nothing immutable is ever replaced."""
        ident = name.partition("/")[2]
        verifier = self.server.verifier
        if ns == "packs":
            # Hashing to the name makes a re-upload byte-identical to what is stored.
            await self.hash_check(functools.partial(verifier.check_pack, name, data),
                                  len(data))
            if await self.call(self.backend.stat, name) is None:
                await self.call(self.backend.put, name, data)
            await self.call(verifier.pack_stored, who, ident, data)  # appends to a log file
            return
        if not await self.call(verifier.check_same, name, data):
            trusted = who.scope.admin
            entries = await self.hash_check(
                functools.partial(verifier.check_index, name, data, trusted),
                len(data) if trusted else INLINE_READ + 1)
            # Two verified indexes of one pack are equal (an index describes its pack
            # exactly), so two uploads racing past check_same store the same bytes.
            await self.call(self.backend.put, name, data)
            self.server.visibility.remember_index(ident, entries)

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
        visibility = self.server.visibility
        if ns == "index":
            # What was worked out for this token before is at hand without a thread hop.
            memo = visibility.memo(who)
            if memo is not None and ident in memo.indexes:
                view = memo.indexes[ident]
            else:
                view = await self.call(visibility.index_view, who, ident)
            if view is None:
                return await self.send_blob(name, offset, length)
            end = len(view) if length is None else min(len(view), offset + length)
            return Response(view[offset:end], media_type="application/octet-stream",
                            headers={p.VIEW_HEADER: "partial"}), max(0, end - offset)
        memo = visibility.memo(who)
        if memo is not None and ident in memo.spans:
            spans: list[tuple[int, int]] | None = memo.spans[ident]
        else:
            spans = await self.call(visibility.pack_spans, who, ident)
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

    async def lost_race(self, name: str) -> Response:
        """409 with the etag that won, and for a disk ref the generation it points to."""
        current = await self.call(self.backend.read_versioned, name)
        etag = current[1] if current else None
        generation = None
        if current and name.startswith("refs/"):
            # Only a hint: a ref that is not a disk's JSON must not turn the 409 into a 500.
            with contextlib.suppress(StickyError):
                latest = DiskRef.decode(current[0]).latest
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
        if ns in _SERVERS_OWN:
            who.require(Permission.ADMIN, None, f"the {ns} namespace")
        else:
            who.require(Permission.READ, None, f"the {ns} namespace")
        names = await self.call(self.backend.list, ns)
        if ns == "refs":
            names = [n for n in names if who.scope.allows(Permission.READ, n[5:])]
        return json_response(p.ListResponse(names=names))

    async def missing(self, request: Request) -> Response:
        """Which of a batch of content-addressed blobs the store lacks."""
        who = self.who(request)
        req = parse_body(p.MissingRequest, await self.body(request))
        for name in req.names:
            if _blob_scope(name)[0] not in _IMMUTABLE:
                raise UsageError(f"{name}: /v1/missing answers for packs and index only")
        who.require(Permission.READ, None, "the store's objects")

        def check() -> list[str]:
            return [n for n in req.names if self.backend.stat(n) is None]

        return json_response(p.MissingResponse(missing=await self.call(check)))


def _blob_scope(name: str) -> tuple[str, str | None]:
    """A served blob name's namespace and, for a ref, the disk key scopes are matched on."""
    check_name(name)
    ns, _, rest = name.partition("/")
    if ns not in _NAMESPACES:
        raise UsageError(f"{name}: namespace {ns!r} is not served by the blob API")
    return ns, (check_key(rest) if ns == "refs" else None)


def _only_touches(old: bytes, new: bytes) -> bool:
    """Whether ref ``new`` is ``old`` with a later ``last_used`` (not in the future) and
    nothing else changed."""
    try:
        a, b = DiskRef.decode(old), DiskRef.decode(new)
        return ((b.key, b.created, b.generations) == (a.key, a.created, a.generations)
                and a.last_used <= b.last_used <= time.time() + _CLOCK_SKEW)
    except (StickyError, TypeError):  # TypeError: a field of the wrong type
        return False


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
