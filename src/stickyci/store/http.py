"""The ``http://HOST:PORT`` backend: a stickyci server (``stickyci serve``) as the store.

The token comes from ``STICKYCI_TOKEN`` and travels only in the Authorization header. Transport
failures and 502/503/504 (transient trouble) are retried with backoff for
``STICKYCI_HTTP_RETRY_SECONDS`` (default 30), long enough to ride out a server restart; every
request is idempotent (content-addressed puts, compare-and-swap on refs), so a retry never
stores anything twice. Anything else the server answers, a permanent 5xx included, is rebuilt
at once into the error it reported (``protocol.error_from``), naming the server and, for the
server's own failures, the request id its log files the details under.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar
from urllib.parse import urlparse

import httpx

from ..errors import NotFound, StoreMisconfigured, StoreUnavailable, UsageError
from . import protocol as p
from .backend import Stat, check_name

T = TypeVar("T")
POOL_SIZE = 32


def retry_window() -> float:
    """Seconds to keep retrying an unreachable server (``STICKYCI_HTTP_RETRY_SECONDS``)."""
    raw = os.environ.get("STICKYCI_HTTP_RETRY_SECONDS", "30")
    try:
        return max(0.0, float(raw))
    except ValueError as exc:
        raise UsageError(f"STICKYCI_HTTP_RETRY_SECONDS={raw!r} is not a number of seconds") from exc


class HttpBackend:
    """Blobs through a stickyci server. Thread-safe, and fork-safe: one client per process."""

    def __init__(self, url: str, token: str | None = None) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise UsageError(f"store URL {url!r}: expected http://HOST:PORT")
        self.url = url.rstrip("/")
        self._token = token if token is not None else os.environ.get("STICKYCI_TOKEN")
        self._window = retry_window()
        self._pid = -1
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"HttpBackend({self.url!r})"  # never the token

    @property
    def _http(self) -> httpx.Client:
        # A forked store worker must not share the parent's pooled connections.
        if self._client is None or self._pid != os.getpid():
            with self._lock:
                if self._client is None or self._pid != os.getpid():
                    headers = {"authorization": f"Bearer {self._token}"} if self._token else {}
                    self._client = httpx.Client(
                        base_url=self.url, headers=headers,
                        timeout=httpx.Timeout(60.0, connect=5.0),
                        limits=httpx.Limits(max_connections=POOL_SIZE,
                                            max_keepalive_connections=POOL_SIZE))
                    self._pid = os.getpid()
        return self._client

    def _send(self, what: str, request: Callable[[httpx.Client], httpx.Response],
              ok: Sequence[int] = (200, 204, 206)) -> httpx.Response:
        """Send with retries; return a response whose status is in ``ok`` or 404/409."""
        deadline = time.monotonic() + self._window
        delay = 0.05
        while True:
            try:
                response = request(self._http)
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}".rstrip(": ")
            else:
                status = response.status_code
                if status in (404, 409) and not response.headers.get(
                        "content-type", "").startswith("application/json"):
                    # Not a stickyci answer (every error of ours is JSON): a wrong host or
                    # path must not pass for an empty store.
                    raise StoreMisconfigured(f"{self.url} is not a stickyci server: it answered "
                                             f"{what} with HTTP {status}; check STICKYCI_STORE")
                if status in ok or status in (404, 409):
                    return response
                rid = response.headers.get(p.REQUEST_ID_HEADER)
                if status not in p.RETRY_STATUS:
                    # Permanent: every runner asking again would get the same answer.
                    raise p.error_from(status, response.content,
                                       f"stickyci server {self.url} {what}", rid)
                # Keep the server's own words (a 503 says what kind of trouble, and its id).
                problem = str(p.error_from(status, response.content, f"HTTP {status}", rid))
            if time.monotonic() + delay > deadline:
                raise StoreUnavailable(f"stickyci server {self.url} failed {what} ({problem}); "
                                       "check that stickyci serve is running there")
            time.sleep(delay * (0.5 + random.random()))  # jitter: many runners retry at once
            delay = min(delay * 2, 2.0)

    def put(self, name: str, data: bytes | memoryview) -> None:
        """Upload a blob (idempotent)."""
        body = bytes(data)
        r = self._send(f"storing {name}", lambda c: c.put(_path(name), content=body))
        if r.status_code in (404, 409):
            raise p.error_from(r.status_code, r.content, f"storing {name}")

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Read a blob or a byte range of it."""
        headers = {}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            headers["range"] = f"bytes={offset}-{end}"
        if length == 0:  # no bytes to fetch, but a missing blob is still NotFound
            if self.stat(name) is None:
                raise NotFound(f"store object {name} is missing")
            return b""
        r = self._send(f"reading {name}", lambda c: c.get(_path(name), headers=headers))
        if r.status_code == 404:
            raise NotFound(f"store object {name} is missing")
        return r.content

    def stat(self, name: str) -> Stat | None:
        """Size and mtime from a HEAD request."""
        r = self._send(f"checking {name}", lambda c: c.head(_path(name)))
        if r.status_code == 404:
            return None
        return Stat(int(r.headers["content-length"]), float(r.headers[p.MTIME_HEADER]))

    def missing(self, names: Sequence[str]) -> list[str]:
        """Ask the server which names it lacks, ``MAX_BATCH`` names a request."""
        out: list[str] = []
        for i in range(0, len(names), p.MAX_BATCH):
            batch = [check_name(n) for n in names[i : i + p.MAX_BATCH]]  # as every method does
            body = p.MissingRequest(names=batch).model_dump_json()
            r = self._send("checking objects", _post_json(f"{p.PREFIX}/missing", body))
            out += p.MissingResponse.model_validate_json(r.content).missing
        return out

    def list(self, namespace: str) -> list[str]:
        """Names under a namespace (refs: those the token may read)."""
        check_name(f"{namespace}/x")
        r = self._send(f"listing {namespace}", lambda c: c.get(f"{p.PREFIX}/list/{namespace}"))
        return p.ListResponse.model_validate_json(r.content).names

    def delete(self, name: str) -> None:
        """Remove a blob."""
        self._send(f"deleting {name}", lambda c: c.delete(_path(name)))

    def read_versioned(self, name: str) -> tuple[bytes, str] | None:
        """Content and etag."""
        r = self._send(f"reading {name}",
                       lambda c: c.get(f"{p.PREFIX}/versioned/{check_name(name)}"))
        if r.status_code == 404:
            return None
        return r.content, r.headers["etag"]

    def put_if(self, name: str, data: bytes, etag: str | None) -> bool:
        """Compare-and-swap; False when the server answers 409 (another writer won)."""
        headers = {"if-match": etag} if etag is not None else {"if-none-match": "*"}
        attempts = 0

        def send(c: httpx.Client) -> httpx.Response:
            nonlocal attempts
            attempts += 1
            return c.put(_path(name), content=data, headers=headers)

        r = self._send(f"updating {name}", send)
        if r.status_code == 404:
            raise p.error_from(404, r.content, f"updating {name}")
        if r.status_code == 409 and attempts > 1:
            # An earlier attempt may have landed and lost only its answer (a dropped
            # connection, a server killed after the write): then the blob holds our bytes,
            # and reporting a lost race would make update_ref apply its change twice.
            current = self.read_versioned(name)
            return current is not None and current[0] == data
        return r.status_code != 409


def _path(name: str) -> str:
    return f"{p.PREFIX}/blobs/{check_name(name)}"


def _post_json(path: str, body: str) -> Callable[[httpx.Client], httpx.Response]:
    return lambda c: c.post(path, content=body, headers={"content-type": "application/json"})
