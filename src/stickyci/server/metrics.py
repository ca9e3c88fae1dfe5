"""Prometheus metrics and structured access logs, measured in one ASGI middleware.

The middleware sits outside the router, so it sees every response, errors included. Routes are
labelled by their family (``blobs``, ``ac``, ``cas``…), never by the requested name, so a
scrape stays small however many objects the store holds. It also gives every request an id,
sent back as ``X-Request-Id`` and written in the access log line, so a client's error and the
server's log of it can be matched.

With ``serve --workers N`` the counters live in prometheus_client's multiprocess mode (one
memory-mapped file per process under ``PROMETHEUS_MULTIPROC_DIR``, which the supervisor sets
before any process imports prometheus_client), and ``render`` sums every process's files, so a
scrape through any worker shows the whole server.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
import time
from contextvars import ContextVar
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..store import protocol as p
from .usage import CacheUse

ACCESS_LOG = logging.getLogger("stickyci.access")
_REQUEST_ID = "request_id"
# The lookup a handler reported (kind, hit), for the per-cache tally of the request.
_LOOKUP: ContextVar[dict[str, Any] | None] = ContextVar("stickyci_lookup", default=None)
_FAMILIES = {"blobs", "versioned", "list", "missing", "disks", "evict", "healthz", "metrics",
             "nix", "twirp", "gha"}


MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"
"""Set (by ``serve --workers``) before prometheus_client is imported: the counters are then
shared by the worker processes."""


class Metrics:
    """The server's counters and histograms, in a registry of their own."""

    def __init__(self) -> None:
        self.shared_dir = os.environ.get(MULTIPROCESS_DIR)
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("stickyci_requests", "HTTP requests served",
                                ["route", "method", "status"], registry=r)
        self.bytes_in = Counter("stickyci_bytes_in", "Request body bytes received", ["route"],
                                registry=r)
        self.bytes_out = Counter("stickyci_bytes_out", "Response body bytes sent", ["route"],
                                 registry=r)
        self.lookups = Counter("stickyci_cache_lookups", "Reads by outcome",
                               ["kind", "result"], registry=r)
        self.evictions = Counter("stickyci_evictions", "Entries evicted", ["kind"], registry=r)
        self.gha_bytes = Counter("stickyci_gha_archive_bytes", "GitHub Actions cache archives: "
                                 "bytes uploaded, decompressed, and new in the store",
                                 ["kind"], registry=r)
        self.latency = Histogram(
            "stickyci_request_seconds", "Request latency", ["route"], registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                     5, 10, 30))
        self.caches = CacheUse()
        self._live: list[Collector] = []
        # Labelled children by their labels: a labels() look-up per update costs more than
        # the update (the hot paths update five per request).
        self._children: dict[tuple[object, ...], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once."""
        key = (id(metric), *labels)
        got = self._children.get(key)
        if got is None:
            got = self._children[key] = metric.labels(*labels)
        return got

    def hit(self, kind: str, found: bool) -> None:
        """Count one read of ``kind`` (ac, cas, blob) as a hit or a miss."""
        self.child(self.lookups, kind, "hit" if found else "miss").inc()
        lookup = _LOOKUP.get()
        if lookup is not None:
            lookup.update(kind=kind, found=found)

    def add_collector(self, collector: Collector) -> None:
        """Add figures computed at each scrape from what every worker shares (files in the
        state directory), so that any one process tells them for the whole server."""
        self.registry.register(collector)
        self._live.append(collector)

    def render(self) -> bytes:
        """The text exposition format: of this process, or summed over the workers'."""
        if self.shared_dir is None:
            return generate_latest(self.registry)
        every = CollectorRegistry()
        MultiProcessCollector(every, self.shared_dir)  # type: ignore[no-untyped-call]
        for collector in self._live:
            every.register(collector)
        return generate_latest(every)


def configure_logs(access_log: bool) -> None:
    """The server's logging: INFO from ``stickyci``, and the access log (one JSON line per
    request on stderr) on or off."""
    access = logging.getLogger("stickyci.access")
    access.propagate = False
    if access_log:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.handlers[:] = [handler]
        access.setLevel(logging.INFO)
    else:
        access.setLevel(logging.WARNING)  # else it inherits INFO below and builds every line
    logging.getLogger("stickyci").setLevel(logging.INFO)


def request_id(scope: Scope) -> str:
    """The id of the request ``scope`` belongs to, made on first use."""
    state: dict[str, Any] = scope.setdefault("state", {})
    rid = state.get(_REQUEST_ID)
    if rid is None:
        # Always ours, never a client's header: a client-chosen id could forge or merge
        # entries in the server's log.
        rid = state[_REQUEST_ID] = secrets.token_hex(8)
    return str(rid)


def route_family(path: str) -> str:
    """``/v1/blobs/packs/ab…`` → ``blobs``; ``/ci/ac/…`` → ``ac``; unknown → ``other``."""
    parts = path.strip("/").split("/")
    # Bazel paths first: an instance may be named like a route ("/metrics/ac/…").
    bazel = parts[-2] if 2 <= len(parts) <= 3 else ""
    if bazel in ("ac", "cas"):
        return bazel
    if parts[0] == "v1" and len(parts) > 1 and parts[1] in _FAMILIES:
        return parts[1]
    if parts[0] in _FAMILIES:
        return parts[0]
    return "other"


class Observe:
    """ASGI middleware: metrics and one JSON access-log line per request (no tokens in it)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        seen: dict[str, int] = {"status": 500, "in": 0, "out": 0}
        rid = (p.REQUEST_ID_HEADER.encode(), request_id(scope).encode())
        lookup: dict[str, Any] = {}
        reset = _LOOKUP.set(lookup)

        async def counted_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                seen["in"] += len(message.get("body", b""))
            return message

        async def counted_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), rid]}
            elif message["type"] == "http.response.body" and scope["method"] != "HEAD":
                # the server drops a HEAD answer's body (an error's JSON): none is sent
                seen["out"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counted_receive, counted_send)
        finally:
            _LOOKUP.reset(reset)
            self._record(scope, seen, time.perf_counter() - start)
            self.metrics.caches.record(scope, lookup.get("kind"), lookup.get("found"),
                                       seen["status"], seen["out"])

    def _record(self, scope: Scope, seen: dict[str, int], elapsed: float) -> None:
        route = route_family(scope["path"])
        m = self.metrics
        m.child(m.requests, route, scope["method"], str(seen["status"])).inc()
        # The series exist from the first request on; adding 0 would cost a write.
        for counter, n in ((m.bytes_in, seen["in"]), (m.bytes_out, seen["out"])):
            child = m.child(counter, route)
            if n:
                child.inc(n)
        m.child(m.latency, route).observe(elapsed)
        if ACCESS_LOG.isEnabledFor(logging.INFO):
            state: dict[str, Any] = scope.get("state") or {}
            client = scope.get("client")
            ACCESS_LOG.info(json.dumps({
                "ts": round(time.time(), 3), "id": state.get(_REQUEST_ID),
                "method": scope["method"], "path": scope["path"],
                "status": seen["status"], "in": seen["in"], "out": seen["out"],
                "ms": round(elapsed * 1000, 2), "token": state.get("principal"),
                "client": client[0] if client else None,
            }, separators=(",", ":")))
