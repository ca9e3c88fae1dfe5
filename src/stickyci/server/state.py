"""What every API of the server shares: its state, and the request plumbing they all use.

That is authentication, the body limit, the hand-off of blocking backend calls to a thread,
sending a blob (streamed when large), parsing and answering JSON, and the one error handler
that turns a ``StickyError`` into an ``ErrorBody`` with the status ``protocol.status_of`` gives.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse

from ..errors import NotFound, StickyError, TooLarge, UsageError
from ..fsutil import page_in
from ..store import Backend, LocalBackend, check_name, open_backend
from ..store import protocol as p
from .auth import ANONYMOUS_READ, Principal, TokenStore
from .config import ServerConfig
from .gha import GhaCache, UrlSigner
from .history import HISTORY_DB, History
from .lru import CacheLRU
from .metrics import Metrics, request_id
from .shared import Change, Changes, RemoteLRU, Shared
from .verify import Verifier
from .visibility import Visibility

log = logging.getLogger("stickyci.server")
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

MAX_BODY_HINT = "; raise stickyci serve --max-body"
"""What ends the message of a body over the server's ``--max-body``."""
STREAM_CHUNK = 8 << 20
INLINE_READ = 256 << 10


class ServerState:
    """State shared by the routes: the backend, tokens, cache accounting and metrics; with
    ``shared`` (one of ``serve --workers N``), what it shares with the other workers."""

    def __init__(self, cfg: ServerConfig, backend: Backend | None = None,
                 shared: Shared | None = None) -> None:
        self.cfg = cfg
        self.shared = shared
        self.backend = backend or open_backend(cfg.store_url)
        # A file:// store answers a stat and a small read from the page cache faster than a
        # hand-off to a worker thread and back (measured: 2x the small GETs per second).
        self.local = self.backend if isinstance(self.backend, LocalBackend) else None
        self._local_root = f"{self.local.root}/" if self.local is not None else ""
        self.tokens = TokenStore(cfg.state_dir, ANONYMOUS_READ if cfg.anonymous_read else None)
        self.changes = shared.changes if shared is not None else Changes()
        self.lru: CacheLRU | RemoteLRU = (
            RemoteLRU(shared.lru) if shared is not None and shared.lru is not None
            else CacheLRU(cfg.max_size))
        self.metrics = Metrics()
        self.visibility = Visibility(self.backend)
        self.verifier = Verifier(self.backend, cfg.state_dir, self.visibility)
        self.gha = GhaCache(self.backend, cfg.state_dir, cfg.max_body, clean=shared is None)
        self.gha_urls = UrlSigner(cfg.state_dir)
        self.history = History(cfg.state_dir / HISTORY_DB)

    def who(self, request: Request) -> Principal:
        """Authenticate the request; its token id goes to the access log, never the token."""
        principal = self.tokens.authenticate(request.headers.get("authorization"))
        request.state.principal = principal.id
        self.catch_up()
        return principal

    def catch_up(self) -> None:
        """Drop what this worker cached of state another worker changed since (before a
        request uses it: every request authenticates first)."""
        if self.changes.changed(Change.REFS):
            self.visibility.refs.invalidate()
        if self.changes.changed(Change.GHA):
            self.gha.reload()

    def refs_changed(self) -> None:
        """Tell the other workers that this one wrote or removed a ref."""
        self.changes.bump(Change.REFS)

    def gha_changed(self) -> None:
        """Tell the other workers that this one changed the GitHub Actions cache's entries."""
        self.changes.bump(Change.GHA)

    async def body(self, request: Request) -> bytes:
        """The request body, refused with 413 as soon as it passes ``max_body``."""
        return await read_limited(request, self.cfg.max_body, "the request body",
                                  MAX_BODY_HINT)

    async def hash_check(self, fn: Callable[[], T], size: int) -> T:
        """Hash a body: inline when small, in a thread when big, so a 16 MiB pack does not
        stall every other request while it is hashed."""
        return fn() if size <= INLINE_READ else await self.call(fn)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking backend call off the event loop."""
        return await run_in_threadpool(fn, *args)

    async def send_blob(self, name: str, offset: int = 0,
                        length: int | None = None) -> tuple[Response, int]:
        """A response carrying a blob (or a range of it), and its size. A blob over
        ``STREAM_CHUNK`` is sent in chunks of that size, so memory stays bounded however
        large the blob and however many clients download at once: from a mapping of the file
        for a ``file://`` store, read into buffers from any other."""
        got: bytes | int = -1
        if self.local is not None:
            got = self.read_inline(name, offset, length, INLINE_READ)
        if not isinstance(got, bytes):
            got = await self.call(self.small_or_end, name, offset, length, STREAM_CHUNK)
        if isinstance(got, bytes):
            return Response(got, media_type="application/octet-stream"), len(got)

        if self.local is not None:
            mapped = await self.call(self.local.map, name)
            view = memoryview(mapped)

            async def chunks() -> AsyncIterator[bytes | memoryview]:
                # The mapping's slices go to the socket as they are: one copy of each byte
                # where reading it into a buffer made two (large GETs were CPU-bound on it).
                for pos in range(offset, got, STREAM_CHUNK):
                    end = min(pos + STREAM_CHUNK, got)
                    await self.call(page_in, mapped, pos, end)
                    yield view[pos:end]
        else:
            async def chunks() -> AsyncIterator[bytes | memoryview]:
                for pos in range(offset, got, STREAM_CHUNK):
                    yield await self.call(self.backend.get, name, pos,
                                          min(STREAM_CHUNK, got - pos))

        return StreamingResponse(chunks(), media_type="application/octet-stream",
                                 headers={"content-length": str(got - offset)}), got - offset

    def read_inline(self, name: str, offset: int, length: int | None,
                    most: int) -> bytes | int:
        """``small_or_end`` for a ``file://`` store, made to run on the event loop: one
        open, fstat and pread (the backend's stat, then open and read, take twice the system
        calls, and pathlib's work on top, for each of a build's many small reads)."""
        check_name(name)
        try:
            fd = os.open(self._local_root + name, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"store object {name} is missing") from None
        except OSError:
            return self.small_or_end(name, offset, length, most)  # the backend names it
        try:
            size = os.fstat(fd).st_size
            end = size if length is None else min(size, offset + length)
            if end - offset > most:
                return end
            return os.pread(fd, max(0, end - offset), offset)
        except OSError:  # a directory in the object's place, an I/O error: as the backend
            return self.small_or_end(name, offset, length, most)
        finally:
            os.close(fd)

    def small_or_end(self, name: str, offset: int, length: int | None,
                      most: int) -> bytes | int:
        """The bytes asked for if they are at most ``most``, else where they end."""
        if length is None or length > most:
            st = self.backend.stat(name)
            if st is None:
                raise NotFound(f"store object {name} is missing")
            end = st.size if length is None else min(st.size, offset + length)
            if end - offset > most:
                return end
        return self.backend.get(name, offset, length)


class Api:
    """The base of an API's handlers: the shared state, and the helpers every route uses
    bound as attributes, so a handler reads ``self.call`` as it would on the state itself."""

    def __init__(self, server: ServerState) -> None:
        self.server = server
        self.backend = server.backend
        self.who = server.who
        self.body = server.body
        self.call = server.call
        self.hash_check = server.hash_check
        self.send_blob = server.send_blob


def parse_body(model: type[M], data: bytes) -> M:
    """A JSON request body as ``model``; an invalid one is a ``UsageError`` naming the field."""
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "body"
        raise UsageError(f"invalid request body: {where}: {first['msg']}") from exc


def json_response(model: BaseModel) -> Response:
    """A protocol model as a JSON response."""
    return Response(model.model_dump_json(), media_type="application/json")


def error_response(request: Request, exc: Exception) -> Response:
    """The handler for every ``StickyError``: its status, and an ``ErrorBody`` that names the
    request id; a server-side failure's details stay in the log."""
    assert isinstance(exc, StickyError)
    status = p.status_of(exc)
    rid = request_id(request.scope)
    if status >= 500:
        # The server's own trouble: its message names endpoints, buckets and paths, which are
        # the operator's business. The log keeps it; the client gets its kind and the id.
        log.warning("request %s: %s %r: %s", rid, request.method, request.url.path, exc)
        message = f"{exc.summary}; the server log has details under request id {rid}"
    else:
        message = str(exc)  # about the client's own request: the specifics help it
    body = p.ErrorBody(error=message, kind=p.kind_of(exc), request_id=rid)
    headers = {"www-authenticate": 'Bearer realm="stickyci"'} if status == 401 else None
    return Response(body.model_dump_json(), status_code=status, media_type="application/json",
                    headers=headers)


async def body_pieces(request: Request, limit: int, what: str,
                      hint: str = "") -> AsyncIterator[bytes]:
    """A request body's pieces as they arrive, refused with 413 as soon as they pass ``limit``
    bytes (at once if the declared length does); a client gone mid-body is a one-line 400.
    ``what`` names the body in the messages, ``hint`` ends them saying what to do."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"{what} of {declared} bytes is over its limit of {limit} bytes{hint}")
    size = 0
    try:
        async for piece in request.stream():
            size += len(piece)
            if size > limit:
                raise TooLarge(f"{what} is over its limit of {limit} bytes{hint}")
            yield piece
    except ClientDisconnect as exc:
        raise UsageError(f"the client went away before {what} was complete; nothing was "
                         "stored") from exc


async def read_limited(request: Request, limit: int, what: str, hint: str = "") -> bytes:
    """A whole request body of at most ``limit`` bytes (:func:`body_pieces`): ``--max-body``
    is for packs, far above what most requests need."""
    # Pieces joined once at the end: a growing bytearray copies a 16 MiB pack ~3 times.
    return b"".join([piece async for piece in body_pieces(request, limit, what, hint)])
