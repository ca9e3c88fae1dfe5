"""The Bazel HTTP remote cache (``[/INSTANCE]/ac|cas/SHA256``), which ccache speaks too.

CAS entries are content-addressed and shared by every instance; AC entries belong to one.
Above ``--max-size`` the least recently used entries are deleted.
"""

from __future__ import annotations

import functools
import hashlib
import re

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ...errors import IntegrityError, NotFound, UsageError
from ..auth import Permission
from ..state import Api, ServerState

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_INSTANCE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")
_METHODS = ["GET", "HEAD", "PUT"]


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
        # CAS entries are content-addressed and shared by every instance; AC entries are not.
        name = f"cas/{digest}" if kind == "cas" else f"ac/{instance}.{digest}"
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


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
