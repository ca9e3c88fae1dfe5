"""The wire protocol between ``stickyci serve`` and the ``http://`` backend, in one place.

Both sides import these paths, headers and models, so a change to the protocol is one change.

    GET    /v1/blobs/{name}             bytes; ``Range: bytes=a-b`` gives 206 with a slice
    HEAD   /v1/blobs/{name}             200 with Content-Length and X-Stickyci-Mtime, or 404
    PUT    /v1/blobs/{name}             store the body; with If-Match / If-None-Match: * it is a
                                        compare-and-swap that answers 409 with the current etag
                                        (refs only: packs and indexes are immutable, verified)
    DELETE /v1/blobs/{name}             remove (absent is fine)
    GET    /v1/versioned/{name}         bytes and their etag in the ETag header, or 404
    GET    /v1/list/{namespace}         ListResponse
    POST   /v1/missing                  MissingRequest → MissingResponse, one round trip
    GET    /v1/disks                    DisksResponse: every disk the token may read
    GET    /v1/disks/{key}              one disk's metadata
    POST   /v1/evict                    EvictRequest → EvictResponse
    GET|HEAD|PUT [/{instance}]/ac/{sha256}, [/{instance}]/cas/{sha256}   Bazel HTTP cache
    GET    /healthz, /metrics

Errors are an ``ErrorBody`` with the status that ``STATUS`` gives their exception class. Every
response carries ``X-Request-Id``. A 4xx body says what was wrong with the request; a 5xx body
says only what kind of trouble the server has (``StickyError.summary``) and the request id under
which the server log keeps the details, so no endpoint, bucket or path reaches a client. Clients
retry 502/503/504 (transient); any other 5xx is permanent and fails at once.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from ..errors import (
    AuthError,
    BackendError,
    ConflictError,
    Forbidden,
    IntegrityError,
    NotFound,
    StickyError,
    StorageFull,
    StoreMisconfigured,
    StoreUnavailable,
    TooLarge,
    UsageError,
)

PREFIX = "/v1"
MTIME_HEADER = "x-stickyci-mtime"
VIEW_HEADER = "x-stickyci-view"
"""On a pack or index a token may read only in part: ``redacted`` (a pack with the bytes of
objects it may not read zeroed) or ``partial`` (an index of the entries it may read)."""
REQUEST_ID_HEADER = "x-request-id"
RETRY_STATUS = frozenset({502, 503, 504})
"""Statuses that mean "try again later": the server or its store is briefly unavailable."""
MAX_BATCH = 10_000
"""Most names one ``/v1/missing`` request may ask about."""


class ErrorBody(BaseModel):
    """Every error response: a one-line message, the error's kind, and for a lost
    compare-and-swap the etag (and, for a disk ref, the generation) that won."""

    error: str
    kind: str
    etag: str | None = None
    generation: int | None = None
    request_id: str | None = None


class MissingRequest(BaseModel):
    """Which of these blobs does the store lack?"""

    names: list[str] = Field(max_length=MAX_BATCH)


class MissingResponse(BaseModel):
    """The subset of the request's names that the store does not hold."""

    missing: list[str]


class ListResponse(BaseModel):
    """Blob names under one namespace."""

    names: list[str]


class DisksResponse(BaseModel):
    """Disks as ``stickyci disk ls --json`` shows them."""

    disks: list[dict[str, Any]]


class EvictRequest(BaseModel):
    """Remove disks unused for ``ttl`` seconds."""

    ttl: float = Field(gt=0)
    dry_run: bool = False


class EvictResponse(BaseModel):
    """What an eviction removed (or would remove)."""

    result: dict[str, Any]


class Health(BaseModel):
    """``/healthz``: the server is up and its store answers. It needs no token, so it names
    only the kind of store (``file``, ``s3``), never its path, endpoint or bucket."""

    status: str
    store: str


STATUS: dict[type[StickyError], int] = {
    AuthError: 401,
    Forbidden: 403,
    TooLarge: 413,
    NotFound: 404,
    ConflictError: 409,
    IntegrityError: 400,
    UsageError: 400,
    StorageFull: 507,
    BackendError: 500,
    StoreMisconfigured: 500,
    StoreUnavailable: 503,
}
"""HTTP status of each error class; the most specific class that matches wins. Only
``StoreUnavailable`` is in ``RETRY_STATUS``: a store error not known to be transient is not
retried, so a refused credential fails every runner at once instead of after a retry window."""

KINDS: dict[str, type[StickyError]] = {cls.__name__: cls for cls in STATUS}


def _nearest(exc: StickyError) -> type[StickyError] | None:
    return next((cls for cls in type(exc).__mro__ if cls in STATUS), None)


def status_of(exc: StickyError) -> int:
    """The HTTP status for an error, by its nearest class in ``STATUS`` (500 if none)."""
    cls = _nearest(exc)
    return 500 if cls is None else STATUS[cls]


def kind_of(exc: StickyError) -> str:
    """The ``kind`` an error is sent as: its nearest class in ``STATUS``."""
    cls = _nearest(exc)
    return "StickyError" if cls is None else cls.__name__


def error_from(status: int, body: bytes, what: str, request_id: str | None = None
               ) -> StickyError:
    """The client side of ``status_of``: rebuild the error a server answered with.

    ``what`` names the server and the operation; it prefixes refusals of the token and the
    server's own failures (5xx), where which server it was matters when runners use several.
    """
    try:
        err = ErrorBody.model_validate_json(body)
        message, kind = err.error, err.kind
        request_id = err.request_id or request_id
    except ValueError:
        message, kind = f"HTTP {status}", ""
        if request_id and status >= 500:  # not our JSON (a crash, a proxy): the id still helps
            message += f"; the server log has details under request id {request_id}"
    cls = KINDS.get(kind)
    if cls is None:
        # 502/503/504 from a proxy in front of the server: the server is away, not broken.
        fallback: type[StickyError] = StoreUnavailable if status in RETRY_STATUS else BackendError
        cls = next((c for c, s in STATUS.items() if s == status), fallback)
    if issubclass(cls, AuthError) or status >= 500 or not kind:
        message = f"{what}: {message}"
    return cls(message)
