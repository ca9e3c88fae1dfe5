"""The wire protocol between ``stickyci serve`` and the ``http://`` backend, in one place.

Both sides import these paths, headers and models, so a change to the protocol is one change.

    GET    /v1/blobs/{name}             bytes; ``Range: bytes=a-b`` gives 206 with a slice
    HEAD   /v1/blobs/{name}             200 with Content-Length and X-Stickyci-Mtime, or 404
    PUT    /v1/blobs/{name}             store the body; with If-Match / If-None-Match: * it is a
                                        compare-and-swap that answers 409 with the current etag
    DELETE /v1/blobs/{name}             remove (absent is fine)
    GET    /v1/versioned/{name}         bytes and their etag in the ETag header, or 404
    GET    /v1/list/{namespace}         ListResponse
    POST   /v1/missing                  MissingRequest → MissingResponse, one round trip
    GET    /v1/disks                    DisksResponse: every disk the token may read
    GET    /v1/disks/{key}              one disk's metadata
    POST   /v1/evict                    EvictRequest → EvictResponse
    GET|HEAD|PUT [/{instance}]/ac/{sha256}, [/{instance}]/cas/{sha256}   Bazel HTTP cache
    GET    /healthz, /metrics

Errors are an ``ErrorBody`` with the status that ``STATUS`` gives their exception class.
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
    TooLarge,
    UsageError,
)

PREFIX = "/v1"
MTIME_HEADER = "x-stickyci-mtime"
MAX_BATCH = 10_000
"""Most names one ``/v1/missing`` request may ask about."""


class ErrorBody(BaseModel):
    """Every error response: a one-line message, the error's kind, and for a lost
    compare-and-swap the etag (and, for a disk ref, the generation) that won."""

    error: str
    kind: str
    etag: str | None = None
    generation: int | None = None


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
    """``/healthz``: the server is up and its store answers."""

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
    BackendError: 503,
}
"""HTTP status of each error class; the most specific class that matches wins."""

KINDS: dict[str, type[StickyError]] = {cls.__name__: cls for cls in STATUS}


def status_of(exc: StickyError) -> int:
    """The HTTP status for an error, by its nearest class in ``STATUS`` (500 if none)."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def error_from(status: int, body: bytes, what: str) -> StickyError:
    """The client side of ``status_of``: rebuild the error a server answered with."""
    try:
        err = ErrorBody.model_validate_json(body)
        message, kind = err.error, err.kind
    except ValueError:
        message, kind = f"{what}: HTTP {status}", ""
    cls = KINDS.get(kind)
    if cls is None:
        cls = next((c for c, s in STATUS.items() if s == status), BackendError)
    if issubclass(cls, AuthError):  # which server refused matters when runners use several
        message = f"{what}: {message}"
    return cls(message)
