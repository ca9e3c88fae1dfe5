"""Operations: ``/healthz`` for load balancers and ``/metrics`` for Prometheus."""

from __future__ import annotations

from urllib.parse import urlparse

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ...store import protocol as p
from ..state import Api, ServerState, json_response


def routes(server: ServerState) -> list[Route]:
    """The operations routes."""
    api = Ops(server)
    return [
        Route("/healthz", api.healthz, methods=["GET"]),
        Route("/metrics", api.metrics_page, methods=["GET"]),
    ]


class Ops(Api):
    """The handlers of the operations routes."""

    async def healthz(self, request: Request) -> Response:
        """Up, and the store answers a listing."""
        await self.call(self.backend.stat, "refs/healthz")
        scheme = urlparse(self.backend.url).scheme or "file"
        return json_response(p.Health(status="ok", store=scheme))

    async def metrics_page(self, request: Request) -> Response:
        """Prometheus exposition."""
        return Response(self.server.metrics.render(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")
