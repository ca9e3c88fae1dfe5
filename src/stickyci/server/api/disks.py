"""The disk admin API (``/v1/disks``, ``/v1/disks/KEY``, ``/v1/evict``): what ``disk ls``,
``disk show`` and ``disk evict`` print, for the disks a token may read."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ... import disks
from ...store import protocol as p
from ..auth import Permission
from ..schedule import evict_disks
from ..state import Api, ServerState, json_response, parse_body


def routes(server: ServerState) -> list[Route]:
    """The disk admin API's routes."""
    api = Disks(server)
    return [
        Route(f"{p.PREFIX}/disks", api.disk_list, methods=["GET"]),
        Route(f"{p.PREFIX}/disks/{{key}}", api.disk_show, methods=["GET"]),
        Route(f"{p.PREFIX}/evict", api.evict, methods=["POST"]),
    ]


class Disks(Api):
    """The handlers of the disk admin API."""

    async def disk_list(self, request: Request) -> Response:
        """Disks the token may read, as ``disk ls --json`` shows them."""
        who = self.who(request)
        found = await self.call(disks.list_disks, self.backend)
        return json_response(p.DisksResponse(
            disks=[d.as_dict() for d in found if who.scope.allows(Permission.READ, d.key)]))

    async def disk_show(self, request: Request) -> Response:
        """One disk's metadata and generations."""
        key = disks.check_key(request.path_params["key"])
        self.who(request).require(Permission.READ, key, f"disk {key}")
        return JSONResponse((await self.call(disks.show, key, self.backend)).as_dict())

    async def evict(self, request: Request) -> Response:
        """Remove disks unused for a TTL (admin)."""
        self.who(request).require(Permission.ADMIN, None, "disk eviction")
        req = parse_body(p.EvictRequest, await self.body(request))
        result = await self.call(evict_disks, self.server, req.ttl, req.dry_run)
        return json_response(p.EvictResponse(result=result.as_dict()))
