"""The GitHub Actions cache service (v2), as ``@actions/cache`` speaks it.

Three Twirp JSON methods under ``/twirp/github.actions.results.api.v1.CacheService/``
(``CreateCacheEntry``, ``FinalizeCacheEntryUpload``, ``GetCacheEntryDownloadURL``),
authenticated by the runner's ``ACTIONS_RUNTIME_TOKEN`` (a stickyci token whose patterns apply
to cache keys); and the signed URLs they hand out, which take the Azure block-blob requests the
client's SDK sends (one ``PUT``, or ``PUT ?comp=block`` then ``?comp=blocklist``) and answer a
plain ``GET``. Entries, matching and storage are :mod:`..ghacache`'s; signing is
:mod:`..ghaurls`'s.
"""

from __future__ import annotations

import email.utils
import logging
import re
import secrets
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path

import zstandard
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ...digest import Digest
from ...errors import NotFound, StickyError, UsageError
from ...store import protocol as p
from ..auth import Permission, Principal
from ..gha import UPLOAD_TTL, CacheEntry, GhaCache, UrlSigner, check_key, check_version
from ..metrics import request_id
from ..state import MAX_BODY_HINT, Api, ServerState, body_pieces, parse_body, read_limited

log = logging.getLogger("stickyci.server")
SERVICE = "/twirp/github.actions.results.api.v1.CacheService"
WRITE_DENIED = "cache write denied:"
READ_DENIED = "cache read denied:"
DOWNLOAD_TTL = 600.0
MAX_RESTORE_KEYS = 9
MAX_TWIRP_BODY = 64 << 10
MAX_BLOCK_LIST = 4 << 20
RESTORE_LEVEL = 1
"""zstd level of a restored (re-compressed) archive: the fastest, the client decompresses it."""
_TWIRP_CODES = {400: "invalid_argument", 401: "unauthenticated", 403: "permission_denied",
                404: "not_found", 409: "already_exists", 413: "invalid_argument",
                503: "unavailable"}
_BLOCK_TAG = re.compile(r"^(Latest|Committed|Uncommitted)$")


class _Message(BaseModel):
    # protobuf JSON: lowerCamelCase names, the original names accepted too; unknown fields
    # (the request's metadata) ignored.
    model_config = ConfigDict(populate_by_name=True, extra="ignore")


class CreateRequest(_Message):
    key: str = ""
    version: str = ""


class FinalizeRequest(_Message):
    key: str = ""
    version: str = ""
    size_bytes: int = Field(default=0, alias="sizeBytes", ge=0)


class DownloadRequest(_Message):
    key: str = ""
    restore_keys: list[str] = Field(default_factory=list, alias="restoreKeys")
    version: str = ""


def routes(server: ServerState) -> list[Route]:
    """The cache service's Twirp methods and its signed upload and download URLs."""
    api = Gha(server)
    return [Route(f"{SERVICE}/{{method}}", api.twirp, methods=["POST"]),
            Route("/gha/upload/{entry_id}", api.upload, methods=["PUT"]),
            Route("/gha/download/{entry_id}", api.download, methods=["GET"])]


class Gha(Api):
    """The handlers of the GitHub Actions cache service."""

    def __init__(self, server: ServerState) -> None:
        super().__init__(server)
        self.gha: GhaCache = server.gha
        self.signer: UrlSigner = server.gha_urls

    # -- Twirp -----------------------------------------------------------------------------

    async def twirp(self, request: Request) -> Response:
        """One Twirp JSON call; every failure is a Twirp JSON error (the client retries
        anything else)."""
        try:
            method = request.path_params["method"]
            handler = {"CreateCacheEntry": self.create,
                       "FinalizeCacheEntryUpload": self.finalize,
                       "GetCacheEntryDownloadURL": self.lookup}.get(method)
            if handler is None:
                raise NotFound(f"the cache service has no method {method[:80]!r}")
            who = self.who(request)
            body = await read_limited(request, MAX_TWIRP_BODY, "a Twirp request")
            return JSONResponse(await handler(request, who, body))
        except StickyError as exc:
            return _twirp_error(request, exc)

    async def create(self, request: Request, who: Principal, body: bytes) -> dict[str, object]:
        """``CreateCacheEntry``: a signed upload URL, or ``ok: false`` and why."""
        req = parse_body(CreateRequest, body)
        key, version = check_key(req.key), check_version(req.version)
        if not who.scope.allows(Permission.WRITE, key):
            return {"ok": False, "message": f"{WRITE_DENIED} token {who.id} may not write "
                    f"cache key {key[:80]!r}; its --write patterns must cover the key"}
        made = await self.call(self.gha.create, who, key, version)
        if isinstance(made, str):
            return {"ok": False, "message": made}
        url = self.signer.url(_base(request), "upload", made.id, UPLOAD_TTL)
        return {"ok": True, "signedUploadUrl": url}

    async def finalize(self, request: Request, who: Principal,
                       body: bytes) -> dict[str, object]:
        """``FinalizeCacheEntryUpload``: check the staged archive's size, store it."""
        req = parse_body(FinalizeRequest, body)
        key, version = check_key(req.key), check_version(req.version)
        who.require(Permission.WRITE, key, f"cache key {key[:80]!r}")
        stored = await self.call(self.gha.finalize, who, key, version, req.size_bytes)
        self.server.gha_changed()
        counted = self.server.metrics.gha_bytes
        counted.labels("uploaded").inc(stored.entry.size)
        counted.labels("content").inc(stored.content)
        counted.labels("new").inc(stored.new)
        return {"ok": True, "entryId": str(stored.entry.id)}

    async def lookup(self, request: Request, who: Principal, body: bytes) -> dict[str, object]:
        """``GetCacheEntryDownloadURL``: the matching entry's signed URL, or ``ok: false``."""
        req = parse_body(DownloadRequest, body)
        if len(req.restore_keys) > MAX_RESTORE_KEYS:
            raise UsageError(f"{len(req.restore_keys)} restore keys; at most "
                             f"{MAX_RESTORE_KEYS}")
        key, version = check_key(req.key), check_version(req.version)
        restore = [check_key(k, "restore key") for k in req.restore_keys]
        if not who.scope.allows(Permission.READ, None):
            raise _ReadDenied(f"{READ_DENIED} token {who.id} may read no cache key")
        entry = await self.call(self.gha.match, who, key, restore, version)
        self.server.metrics.hit("gha", entry is not None)
        if entry is None:
            return {"ok": False}
        await self.call(self.gha.touch, entry)
        url = self.signer.url(_base(request), "download", entry.id, DOWNLOAD_TTL)
        return {"ok": True, "signedDownloadUrl": url, "matchedKey": entry.key}

    # -- signed URLs -----------------------------------------------------------------------

    def _signed(self, request: Request, op: str) -> int:
        raw = request.path_params["entry_id"]
        if not raw.isdigit() or len(raw) > 20:
            raise NotFound(f"no cache entry {raw[:40]!r}")
        entry_id = int(raw)
        q = request.query_params
        self.signer.check(op, entry_id, q.get("exp"), q.get("sig"))
        request.state.principal = f"gha-{op}"
        return entry_id

    async def upload(self, request: Request) -> Response:
        """The Azure block-blob requests on a signed upload URL."""
        upload = self.gha.upload(self._signed(request, "upload"))
        comp = request.query_params.get("comp")
        limit = self.gha.max_archive
        if comp is None:
            await _receive(request, upload.archive, limit)
        elif comp == "block":
            path = upload.block(request.query_params.get("blockid", ""))
            staged = await self.call(_dir_size, path.parent)
            await _receive(request, path, limit - staged)
        elif comp == "blocklist":
            ids = _block_ids(await read_limited(request, MAX_BLOCK_LIST, "a block list"))
            await self.call(self.gha.commit_blocks, upload, ids)
        else:
            raise UsageError(f"comp={comp[:40]!r} is not an upload this server takes; it "
                             "takes a whole blob, comp=block and comp=blocklist")
        return Response(status_code=201, headers={
            "etag": f'"0x{secrets.token_hex(8).upper()}"',
            "last-modified": email.utils.formatdate(usegmt=True),
            "x-ms-request-id": request_id(request.scope),
            "x-ms-version": request.headers.get("x-ms-version", "2023-11-03"),
            "x-ms-request-server-encrypted": "false"})

    async def download(self, request: Request) -> Response:
        """A plain ``GET`` of an entry's archive on a signed download URL."""
        self.server.catch_up()  # an entry another worker stored just now
        entry = await self.call(self.gha.find, self._signed(request, "download"))
        chunks = await self.call(self.gha.chunks, entry)
        return StreamingResponse(self._stream(entry, chunks),
                                 media_type="application/octet-stream",
                                 headers=None if entry.inflated else {
                                     "content-length": str(entry.size)})

    async def _stream(self, entry: CacheEntry, chunks: list[Digest]) -> AsyncIterator[bytes]:
        if not entry.inflated:
            for digest in chunks:
                yield await self.call(self.gha.read, digest)
            return
        packer = zstandard.ZstdCompressor(level=RESTORE_LEVEL).compressobj()
        for digest in chunks:
            data = await self.call(lambda d=digest: packer.compress(self.gha.read(d)))
            if data:
                yield data
        yield packer.flush()


class _ReadDenied(StickyError):
    """A lookup by a token that may read no cache key (Twirp ``permission_denied``)."""


def _twirp_error(request: Request, exc: StickyError) -> Response:
    status = 403 if isinstance(exc, _ReadDenied) else p.status_of(exc)
    rid = request_id(request.scope)
    if status >= 500:  # the server's own trouble: details stay in its log, as elsewhere
        log.warning("request %s: %s %r: %s", rid, request.method, request.url.path, exc)
        message = f"{exc.summary}; the server log has details under request id {rid}"
    else:
        message = str(exc)
    code = _TWIRP_CODES.get(status, "internal")
    return JSONResponse({"code": code, "msg": message, "meta": {"request_id": rid}},
                        status_code=400 if status == 413 else status)


def _base(request: Request) -> str:
    # The address the client reached us by: the one it can reach the signed URLs by.
    return str(request.base_url)


async def _receive(request: Request, path: Path, limit: int) -> None:
    """Stream the body into ``path`` (atomically: a part file renamed once complete), refused
    as soon as it passes ``limit``."""
    part = path.with_name(f"{path.name}.{secrets.token_hex(4)}.part")
    try:
        with open(part, "wb") as out:
            async for data in body_pieces(request, limit, "an upload",
                                          f" (what this archive may still take){MAX_BODY_HINT}"):
                out.write(data)
        part.rename(path)
    finally:
        part.unlink(missing_ok=True)


def _block_ids(body: bytes) -> list[str]:
    """The block ids of an Azure ``BlockList`` document, in order."""
    if b"<!" in body:  # no DOCTYPE or entities: nothing for the parser to expand
        raise UsageError("a block list may not hold a DOCTYPE or entity declarations")
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise UsageError(f"the block list is not XML ({exc})") from exc
    if root.tag != "BlockList":
        raise UsageError(f"the block list's root is <{root.tag[:40]}>, not <BlockList>")
    ids = []
    for el in root:
        if not _BLOCK_TAG.match(el.tag) or not el.text:
            raise UsageError(f"the block list holds <{el.tag[:40]}>; it takes <Latest>, "
                             "<Committed> and <Uncommitted> block ids")
        ids.append(el.text.strip())
    return ids


def _dir_size(path: Path) -> int:
    return sum(e.stat().st_size for e in path.iterdir() if e.is_file())
