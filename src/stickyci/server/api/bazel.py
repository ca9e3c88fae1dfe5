"""The Bazel HTTP remote cache (``[/INSTANCE]/ac|cas/SHA256``), which ccache speaks too.

Every instance is a cache of its own, its CAS too: a token of one instance can neither read nor
probe another's content by its digest. Above ``--max-size`` the least recently used entries
are deleted.

Reads are most of a build's requests, so on a ``file://`` store ``FastReads`` answers
``GET|HEAD [/instance]/ac|cas/<sha256>`` of a small entry in front of the router (inside the
metrics and access-log middleware): the same checks and answers as the route, without
Starlette's routing, request object and exception layers, which cost more than the read.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Sequence

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ...errors import IntegrityError, NotFound, StickyError, UsageError
from ..auth import Permission
from ..state import INLINE_READ, Api, ServerState, error_response

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_INSTANCE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")
_METHODS = ["GET", "HEAD", "PUT"]
_READ = re.compile(r"^(?:/([A-Za-z0-9][A-Za-z0-9_-]{0,99}))?/(ac|cas)/([0-9a-f]{64})$")
"""A read the fast path may answer: the routes' paths, with a valid instance and digest."""
_ENTRY_PATHS = {"/ac/{digest}", "/cas/{digest}", "/{instance}/ac/{digest}",
                "/{instance}/cas/{digest}"}
_OCTETS = (b"content-type", b"application/octet-stream")


def routes(server: ServerState) -> list[Route]:
    """The Bazel cache's routes, with and without an instance name."""
    api = Bazel(server)
    return [Route(path, api.entry, methods=_METHODS)
            for path in ("/ac/{digest}", "/cas/{digest}",
                         "/{instance}/ac/{digest}", "/{instance}/cas/{digest}")]


class Bazel(Api):
    """The handlers of the Bazel cache."""

    async def entry(self, request: Request) -> Response:
        """``GET|HEAD|PUT [/instance]/ac|cas/<sha256>``; CAS uploads must hash to their name."""
        kind = "cas" if "/cas/" in request.scope["path"] else "ac"  # request.url is costly
        digest = request.path_params["digest"]
        instance = request.path_params.get("instance", "default")
        if not _SHA256.match(digest):
            raise UsageError(f"{digest!r} is not a SHA-256 digest (64 lowercase hex digits)")
        if not _INSTANCE.match(instance):
            raise UsageError(f"instance name {instance!r}: use letters, digits, '_' and '-'")
        who = self.who(request)
        name = entry_name(kind, instance, digest)
        lru, metrics = self.server.lru, self.server.metrics
        if request.method == "PUT":
            who.require(Permission.WRITE, instance, f"the {instance} cache")
            data = await self.body(request)
            if kind == "cas" and await self.hash_check(
                    functools.partial(_sha256, data), len(data)) != digest:
                raise IntegrityError(f"CAS upload does not hash to {digest}; nothing stored")
            await self.call(self.backend.put, name, data)
            lru.touch(name, len(data))
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
            metrics.hit(kind, False)
            lru.forget(name)
            raise
        metrics.hit(kind, True)
        lru.touch(name, size)
        return response

    async def enforce_max_size(self) -> None:
        """Evict least-recently-used cache entries once the cache is over ``--max-size``."""
        lru = self.server.lru
        for name in lru.over():
            await self.call(self.backend.delete, name)
            lru.forget(name)
            self.server.metrics.evictions.labels(name.partition("/")[0]).inc()


def entry_name(kind: str, instance: str, digest: str) -> str:
    """The store name of an ``ac`` or ``cas`` entry of an instance. The CAS is per instance
    as well: shared, a token of ``pr-1`` could fetch (or learn that another instance holds) any
    content whose digest it can guess."""
    return f"{kind}/{instance}.{digest}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FastReads:
    """ASGI: small Bazel cache reads of a ``file://`` store answered directly, everything
    else passed on to ``app``."""

    def __init__(self, app: ASGIApp, server: ServerState, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.server = server
        # A remote store's reads belong in threads: the route's.
        self.on = server.local is not None
        # An instance named like another route's first segment ("/nix/ac/…") is that route's.
        self.taken = {r.path.split("/")[1] for r in routes
                      if isinstance(r, Route) and r.path not in _ENTRY_PATHS}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.on and scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
            m = _READ.match(scope["path"])
            if m is not None and m.group(1) not in self.taken:
                try:
                    if await self.read(scope, send, m.group(1), m.group(2), m.group(3)):
                        return
                except StickyError as exc:
                    response = error_response(Request(scope), exc)
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)

    async def read(self, scope: Scope, send: Send, instance: str | None, kind: str,
                   digest: str) -> bool:
        """Answer the read, as ``Bazel.entry`` does; False if the entry is too large to
        answer here (the route streams it)."""
        server = self.server
        header = None
        for k, v in scope["headers"]:
            if k == b"authorization":
                header = v.decode("latin-1")
                break
        who = server.tokens.authenticate(header)
        scope.setdefault("state", {})["principal"] = who.id
        if instance is None:
            instance = "default"
        else:
            scope["path_params"] = {"instance": instance, "digest": digest}  # for usage.py
        who.require(Permission.READ, instance, f"the {instance} cache")
        name = entry_name(kind, instance, digest)
        try:
            if scope["method"] == "HEAD":
                st = server.backend.stat(name)
                if st is None:
                    raise NotFound(f"{kind} entry {digest} is not in the cache")
                size, body = st.size, b""
            else:
                got = server.read_inline(name, 0, None, INLINE_READ)
                if not isinstance(got, bytes):
                    return False
                size, body = len(got), got
        except NotFound:
            server.metrics.hit(kind, False)
            server.lru.forget(name)
            raise
        server.metrics.hit(kind, True)
        server.lru.touch(name, size)
        headers = [(b"content-length", str(size).encode())]
        if body:
            headers.append(_OCTETS)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return True
