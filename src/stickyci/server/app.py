"""The ASGI application behind ``stickyci serve``: wiring only.

It builds the shared state, mounts each API's routes (one module per API under ``api/``),
installs the error handler, seeds the Bazel cache accounting and starts the eviction schedule
at start-up, and wraps everything in the metrics and access-log middleware.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette

from ..errors import StickyError
from ..store import Backend
from .api import bazel, blobs, dashboard, disks, gha, nix, ops, runs
from .history import sample_loop
from .metrics import Observe
from .schedule import evict_loop
from .state import ServerConfig, ServerState, error_response

__all__ = ["ServerConfig", "create_app"]


def create_app(cfg: ServerConfig, backend: Backend | None = None) -> Observe:
    """The server as an ASGI app, wrapped in metrics and access logging."""
    server = ServerState(cfg, backend)
    # Order matters where paths overlap: the Bazel routes, which take any instance name as
    # their first segment, come last.
    routes = [*ops.routes(server), *blobs.routes(server), *disks.routes(server),
              *nix.routes(server), *gha.routes(server), *runs.routes(server),
              *dashboard.routes(server), *bazel.routes(server)]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        """Seed the cache accounting, run disk eviction on its schedule, and sample the
        history."""
        tasks = []
        if cfg.max_size is not None:
            await server.call(server.lru.seed, server.backend)
        if cfg.evict_after:
            tasks.append(asyncio.create_task(evict_loop(server, cfg.evict_after)))
        sampler = asyncio.create_task(
            sample_loop(server.history, server.metrics, server.backend))
        tasks.append(sampler)
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            # It writes what the minute under way counted as it ends (a gc in flight is
            # not waited for).
            await asyncio.gather(sampler, return_exceptions=True)

    app = Starlette(routes=routes, exception_handlers={StickyError: error_response},
                    lifespan=lifespan)
    app.state.server = server
    return Observe(app, server.metrics)
