"""The ASGI application behind ``stickyci serve``: wiring only.

It builds the shared state, mounts each API's routes (one module per API under ``api/``),
installs the error handler, seeds the Bazel cache accounting and starts the eviction schedule
at start-up, puts the Bazel cache's reads on a path of their own in front of the router, and
wraps everything in the metrics and access-log middleware. One of several workers
(``shared``) leaves the cache accounting to the supervisor, and only the first runs the
schedules that must run once per server.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette

from ..errors import StickyError
from ..store import Backend
from .api import bazel, blobs, dashboard, disks, gha, nix, ops, runs
from .config import ServerConfig
from .history import sample_loop
from .lru import CacheLRU
from .metrics import Observe
from .schedule import evict_loop
from .shared import Shared
from .state import ServerState, error_response

__all__ = ["ServerConfig", "create_app"]


def create_app(cfg: ServerConfig, backend: Backend | None = None,
               shared: Shared | None = None) -> Observe:
    """The server as an ASGI app, wrapped in metrics and access logging; ``shared`` makes it
    one of the workers of ``serve --workers N``."""
    server = ServerState(cfg, backend, shared)
    primary = shared is None or shared.primary
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
        if cfg.max_size is not None and isinstance(server.lru, CacheLRU):
            await server.call(server.lru.seed, server.backend)
        if cfg.evict_after and primary:
            tasks.append(asyncio.create_task(evict_loop(server, cfg.evict_after)))
        # Every worker samples what it counted (the history adds them up); the store's size
        # is measured by one.
        sampler = asyncio.create_task(sample_loop(server.history, server.metrics,
                                                  server.backend if primary else None))
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
    return Observe(bazel.FastReads(app, server, routes), server.metrics)
