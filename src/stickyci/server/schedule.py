"""Disk eviction on the server: one pass (also behind ``POST /v1/evict``), and the schedule
that runs a pass and then gc every ``--evict-every``."""

from __future__ import annotations

import asyncio
import functools
import logging
import time

from .. import disks
from ..errors import StickyError
from .history import GcRun, record_gc
from .state import ServerState

log = logging.getLogger("stickyci.server")
EVICT_EVERY_FLOOR = 1.0


def evict_disks(server: ServerState, ttl: float, dry_run: bool = False) -> disks.EvictResult:
    """Disk TTL eviction, counted in the metrics."""
    result = disks.evict(ttl, dry_run=dry_run, store=server.backend)
    server.visibility.refs.invalidate()
    if not dry_run:
        server.metrics.evictions.labels("disk").inc(len(result.evicted))
        if result.evicted:
            server.refs_changed()  # the other workers of serve --workers cached them too
    return result


async def evict_loop(server: ServerState, ttl: float) -> None:
    """Evict disks unused for ``ttl``, then gc, every ``evict_every`` seconds until cancelled."""
    cfg = server.cfg
    # Eviction only drops refs; the gc after it reclaims their objects (and those of disks
    # removed by hand). gc spares packs younger than its grace, so commits in flight on
    # runners are safe, and a commit re-checks its packs before it moves a ref.
    while True:
        try:
            started, clock = time.time(), time.monotonic()
            result = await server.call(evict_disks, server, ttl)
            if result.evicted:
                log.info("evicted disks unused for %ss: %s", ttl, result.evicted)
            stale = await server.call(server.gha.evict, ttl)
            server.metrics.evictions.labels("gha").inc(len(stale))
            if stale:
                server.gha_changed()
            report = await server.call(
                functools.partial(disks.gc, server.backend, grace=cfg.gc_grace))
            log.info("gc freed %d bytes", report.bytes_freed)
            await server.call(record_gc, server.history, server.backend, GcRun.of(
                report, started, time.monotonic() - clock, len(result.evicted), len(stale)))
        except StickyError as exc:
            log.warning("scheduled disk eviction failed: %s", exc)
        except Exception:  # a bug must not end the schedule: log it, try next time
            log.exception("scheduled disk eviction failed unexpectedly; trying again in "
                          "%ss", cfg.evict_every)
        # A period of 0 would spin the event loop; the CLI refuses one, a caller may not.
        await asyncio.sleep(max(cfg.evict_every, EVICT_EVERY_FLOOR))
