"""The ``http://HOST:PORT`` backend: a stickyci server (``stickyci serve``) as the store.

The token comes from ``STICKYCI_TOKEN`` and travels only in the Authorization header. Each call
is one request; ``store.retry.RetryBackend`` wraps this backend to ride out a server restart
(``open_backend`` composes the two). Transport failures and 502/503/504 (transient trouble)
are raised as ``StoreUnavailable``, the one error a retry may cure. Anything else the server
answers, a permanent 5xx included, is rebuilt into the error it reported
(``protocol.error_from``). Both name the server and, for the server's own failures, the request
id its log files the details under.
"""

from __future__ import annotations

import os
import ssl
import threading
from collections.abc import Sequence
from urllib.parse import urlparse

import httpx2

from ..digest import Digest
from ..errors import NotFound, StoreMisconfigured, StoreUnavailable, UsageError
from . import protocol as p
from .backend import Stat, check_name

POOL_SIZE = 32
_OK = (200, 204, 206)


class HttpBackend:
    """Blobs through a stickyci server, one request a call. Thread-safe, and fork-safe with its
    own client: one pool per process."""

    def __init__(self, url: str, token: str | None = None, *,
                 client: httpx2.Client | None = None) -> None:
        """Talk to the server at ``url`` with ``token`` (default ``STICKYCI_TOKEN``).

        ``client`` replaces the pooled client, as is: requests go to absolute URLs under
        ``url``, so any ``httpx2.Client`` serves, Starlette's ``TestClient`` included (the
        server in process, for tests of routing and auth). Its owner closes it, and keeps it
        out of forked children.
        """
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise UsageError(f"store URL {url!r}: expected http://HOST:PORT")
        self.url = url.rstrip("/")
        token = token if token is not None else os.environ.get("STICKYCI_TOKEN")
        self._auth = {"authorization": f"Bearer {token}"} if token else {}
        # What this token is shown depends on the token: a local index is kept per token
        # (its hash: the token itself never reaches a file name).
        self.cache_scope = f"{self.url}#{Digest.of((token or '').encode()).hex[:32]}"
        self._injected = client
        self._pid = -1
        self._client: httpx2.Client | None = None
        self._tls: ssl.SSLContext | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"HttpBackend({self.url!r})"  # never the token

    @property
    def _http(self) -> httpx2.Client:
        if self._injected is not None:
            return self._injected
        # A forked store worker must not share the parent's pooled connections.
        if self._client is None or self._pid != os.getpid():
            with self._lock:
                if self._client is None or self._pid != os.getpid():
                    # Loading the CA bundle costs ~40 ms of CPU: do it once, and let forked
                    # workers, which each need a client of their own, inherit the context.
                    if self._tls is None:
                        self._tls = httpx2.create_ssl_context()
                    self._client = httpx2.Client(
                        verify=self._tls,
                        timeout=httpx2.Timeout(60.0, connect=5.0),
                        limits=httpx2.Limits(max_connections=POOL_SIZE,
                                            max_keepalive_connections=POOL_SIZE))
                    self._pid = os.getpid()
        return self._client

    def _send(self, what: str, method: str, path: str, *, content: bytes | str | None = None,
              headers: dict[str, str] | None = None) -> httpx2.Response:
        """One request; a response whose status is in ``_OK`` or 404/409, else the error."""
        try:
            response = self._http.request(method, f"{self.url}{path}", content=content,
                                          headers={**self._auth, **(headers or {})})
        except httpx2.TransportError as exc:
            problem = f"{type(exc).__name__}: {exc}".rstrip(": ")
        else:
            status = response.status_code
            if status in (404, 409) and not response.headers.get(
                    "content-type", "").startswith("application/json"):
                # Not a stickyci answer (every error of ours is JSON): a wrong host or
                # path must not pass for an empty store.
                raise StoreMisconfigured(f"{self.url} is not a stickyci server: it answered "
                                         f"{what} with HTTP {status}; check STICKYCI_STORE")
            if status in _OK or status in (404, 409):
                return response
            rid = response.headers.get(p.REQUEST_ID_HEADER)
            if status not in p.RETRY_STATUS:
                # Permanent: every runner asking again would get the same answer.
                raise p.error_from(status, response.content,
                                   f"stickyci server {self.url} {what}", rid)
            # Keep the server's own words (a 503 says what kind of trouble, and its id).
            problem = str(p.error_from(status, response.content, f"HTTP {status}", rid))
        raise StoreUnavailable(f"stickyci server {self.url} failed {what} ({problem}); "
                               "check that stickyci serve is running there")

    def put(self, name: str, data: bytes | memoryview) -> None:
        """Upload a blob (idempotent)."""
        r = self._send(f"storing {name}", "PUT", _path(name), content=bytes(data))
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
        r = self._send(f"reading {name}", "GET", _path(name), headers=headers)
        if r.status_code == 404:
            raise NotFound(f"store object {name} is missing")
        return r.content

    def stat(self, name: str) -> Stat | None:
        """Size and mtime from a HEAD request."""
        r = self._send(f"checking {name}", "HEAD", _path(name))
        if r.status_code == 404:
            return None
        return Stat(int(r.headers["content-length"]), float(r.headers[p.MTIME_HEADER]))

    def missing(self, names: Sequence[str]) -> list[str]:
        """Ask the server which names it lacks, ``MAX_BATCH`` names a request."""
        out: list[str] = []
        for i in range(0, len(names), p.MAX_BATCH):
            batch = [check_name(n) for n in names[i : i + p.MAX_BATCH]]  # as every method does
            body = p.MissingRequest(names=batch).model_dump_json()
            r = self._send("checking objects", "POST", f"{p.PREFIX}/missing", content=body,
                           headers={"content-type": "application/json"})
            out += p.MissingResponse.model_validate_json(r.content).missing
        return out

    def list(self, namespace: str) -> list[str]:
        """Names under a namespace (refs: those the token may read)."""
        check_name(f"{namespace}/x")
        r = self._send(f"listing {namespace}", "GET", f"{p.PREFIX}/list/{namespace}")
        return p.ListResponse.model_validate_json(r.content).names

    def delete(self, name: str) -> None:
        """Remove a blob."""
        self._send(f"deleting {name}", "DELETE", _path(name))

    def read_versioned(self, name: str) -> tuple[bytes, str] | None:
        """Content and etag."""
        r = self._send(f"reading {name}", "GET", f"{p.PREFIX}/versioned/{check_name(name)}")
        if r.status_code == 404:
            return None
        return r.content, r.headers["etag"]

    def put_if(self, name: str, data: bytes, etag: str | None) -> bool:
        """Compare-and-swap; False when the server answers 409 (another writer won).

        One attempt: a retry after a lost answer is ``RetryBackend.put_if``'s to judge.
        """
        headers = {"if-match": etag} if etag is not None else {"if-none-match": "*"}
        r = self._send(f"updating {name}", "PUT", _path(name), content=data, headers=headers)
        if r.status_code == 404:
            raise p.error_from(404, r.content, f"updating {name}")
        return r.status_code != 409


def _path(name: str) -> str:
    return f"{p.PREFIX}/blobs/{check_name(name)}"
