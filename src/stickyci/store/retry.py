"""Retries as a wrapper: any backend, retried with backoff while it reports ``StoreUnavailable``.

restic's ``RetryBackend`` is the model: the backend underneath makes one attempt per call and
says what went wrong; this wrapper alone decides whether to try again. Only ``StoreUnavailable``
(a server away or restarting, a proxy's 502/503/504) is retried, for a window of seconds with
jittered exponential backoff, long enough to ride out a restart; anything else, ``NotFound`` and
a lost compare-and-swap included, passes through at once, since every runner asking again would
get the same answer.

Every call but one is idempotent, so repeating it is safe: content-addressed puts store the same
bytes under the same name, and reads, stats, listings and deletes change nothing twice. The
exception is ``put_if``: an attempt may land and lose only its answer (a dropped connection, a
server killed after the write), and the retry then finds its own write in place and loses the
compare-and-swap against it. ``put_if`` therefore reads the blob back after such a loss.

``open_backend`` wraps the ``http://`` backend only. ``file://`` has no transient failure to
wait out, and ``s3://`` is retried per request by botocore (standard or adaptive mode, under its
retry quota): a second loop around it would multiply the attempts every runner makes against a
service in trouble and keep retrying for the window what botocore has already given up on.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from ..errors import StoreUnavailable, UsageError
from .backend import Backend, Stat
from .localindex import scope_of

T = TypeVar("T")
FIRST_DELAY = 0.05
MAX_DELAY = 2.0


def retry_window() -> float:
    """Seconds to keep retrying an unreachable server (``STICKYCI_HTTP_RETRY_SECONDS``)."""
    raw = os.environ.get("STICKYCI_HTTP_RETRY_SECONDS", "30")
    try:
        return max(0.0, float(raw))
    except ValueError as exc:
        raise UsageError(f"STICKYCI_HTTP_RETRY_SECONDS={raw!r} is not a number of seconds") from exc


class RetryBackend:
    """``inner``, with each call retried while it raises ``StoreUnavailable``."""

    def __init__(self, inner: Backend, window: float | None = None) -> None:
        """Retry for ``window`` seconds (None: ``retry_window()``, read now); 0 tries once."""
        self.inner = inner
        self.url = inner.url
        self.cache_scope = scope_of(inner)
        self.window = retry_window() if window is None else max(0.0, window)

    def __repr__(self) -> str:
        return f"RetryBackend({self.inner!r})"

    def _retry(self, call: Callable[[], T]) -> T:
        """``call()``, again after each ``StoreUnavailable`` until the window is spent; then
        the last attempt's error, which names the server and what it said."""
        deadline = time.monotonic() + self.window
        delay = FIRST_DELAY
        while True:
            try:
                return call()
            except StoreUnavailable:
                if time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay * (0.5 + random.random()))  # jitter: many runners retry at once
            delay = min(delay * 2, MAX_DELAY)

    def put(self, name: str, data: bytes | memoryview) -> None:
        """Store a blob (idempotent: a repeat stores the same bytes again)."""
        self._retry(lambda: self.inner.put(name, data))

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Read a blob or a byte range of it."""
        return self._retry(lambda: self.inner.get(name, offset, length))

    def stat(self, name: str) -> Stat | None:
        """Size and mtime, or None."""
        return self._retry(lambda: self.inner.stat(name))

    def missing(self, names: Sequence[str]) -> list[str]:
        """The names the store lacks."""
        return self._retry(lambda: self.inner.missing(names))

    def list(self, namespace: str) -> list[str]:
        """Names under a namespace."""
        return self._retry(lambda: self.inner.list(namespace))

    def delete(self, name: str) -> None:
        """Remove a blob (absent is fine, so a repeat after a lost answer is too)."""
        self._retry(lambda: self.inner.delete(name))

    def read_versioned(self, name: str) -> tuple[bytes, str] | None:
        """Content and etag, or None."""
        return self._retry(lambda: self.inner.read_versioned(name))

    def put_if(self, name: str, data: bytes, etag: str | None) -> bool:
        """Compare-and-swap, retried; a loss after a retry is checked against the blob."""
        attempts = 0

        def attempt() -> bool:
            nonlocal attempts
            attempts += 1
            return self.inner.put_if(name, data, etag)

        won = self._retry(attempt)
        if won or attempts == 1:
            return won
        # An earlier attempt may have landed and lost only its answer: then the blob holds
        # our bytes, and reporting a lost race would make update_ref apply its change twice.
        current = self.read_versioned(name)
        return current is not None and current[0] == data
