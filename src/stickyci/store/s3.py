"""The ``s3://BUCKET/PREFIX`` backend: one object per blob in any S3-compatible service.

Endpoint, region and credentials come from the standard AWS configuration (environment,
``~/.aws``, instance roles); ``STICKYCI_S3_ENDPOINT`` names a non-AWS endpoint. botocore
retries throttling and transient failures with backoff ("standard" mode, or "adaptive" if
configured); any other error is reported at once, translated into stickyci's exception tree
by kind: ``StoreUnavailable`` for trouble a later attempt may not meet (a connection refused or
cut, a timeout, a 5xx or SlowDown), ``StoreMisconfigured`` for refusals that only a change of
configuration ends (credentials, access, a missing bucket, a bad endpoint or TLS setup).

``put_if`` is a conditional write (``If-None-Match: *`` / ``If-Match``). A server that ignores
those headers is detected once per backend; compare-and-swap then runs under a lease object
``PREFIX/.locks/<name>.lease`` (outside every namespace, so ``list`` never sees it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import boto3
import botocore.session
from botocore import exceptions as bx
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from ..errors import BackendError, NotFound, StoreMisconfigured, StoreUnavailable, UsageError
from .backend import Stat, check_name

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

# Enough connections for the store's writer threads and restore's reader threads at once.
POOL_SIZE = max(32, 4 * (os.cpu_count() or 1))
LEASE_TTL = 30.0  # a lease older than this belongs to a dead writer and may be broken
LEASE_SETTLE = 0.1  # wait after writing a lease so a concurrent writer's overwrite shows
LEASE_WAIT = 2 * LEASE_TTL

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_BAD_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
                    "ExpiredToken"}
_DENIED = {"AccessDenied", "AllAccessDisabled", "AccountProblem"}
_BUSY = {"SlowDown", "RequestTimeout", "ServiceUnavailable", "InternalError", "Throttling",
         "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException",
         "OperationAborted"}
# Transport trouble, except TLS: a handshake that fails does so on every attempt.
_TRANSIENT_TRANSPORT = (bx.ConnectionError, bx.HTTPClientError, bx.IncompleteReadError)
_SETUP = (bx.SSLError, bx.PartialCredentialsError, bx.CredentialRetrievalError,
          bx.ProfileNotFound, bx.BaseEndpointResolverError, bx.ValidationError,
          bx.InvalidConfigError, bx.ConfigNotFound, bx.ConfigParseError,
          bx.InvalidEndpointConfigurationError, bx.UnknownCredentialError,
          bx.TokenRetrievalError, bx.SSOError, bx.InvalidRetryConfigurationError,
          bx.UnknownSignatureVersionError, bx.InvalidS3AddressingStyleError)
_LOST_RACE = {"PreconditionFailed", "ConditionalRequestConflict"}
_MISSING = {"NoSuchKey", "404"}  # HEAD responses have no body, so only the status code


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _no_expect_header(params: dict[str, Any], **_: Any) -> None:
    # botocore asks every PUT to "Expect: 100-continue", and when a server answers with a final
    # status instead (always for an empty body on SeaweedFS) botocore leaves the pooled
    # connection poisoned: the next request stalls for the read timeout, then is silently
    # re-sent (boto/botocore#3755). A re-sent conditional PUT would report a lost race it won.
    params.get("headers", {}).pop("Expect", None)


class S3Backend:
    """Blobs as objects ``PREFIX/<namespace>/<id>`` in one bucket. Thread- and fork-safe."""

    def __init__(self, url: str, *, config: Config | None = None,
                 conditional_writes: bool | None = None) -> None:
        """Open ``s3://BUCKET[/PREFIX]``. No request is made until the first operation.

        ``config`` is merged over the defaults (pool, timeouts, retries); ``conditional_writes``
        skips the server probe (False forces the lease fallback).
        """
        parsed = urlparse(url)
        bucket, prefix = parsed.netloc, parsed.path.strip("/")
        if parsed.scheme != "s3" or not _BUCKET.match(bucket):
            raise UsageError(f"store URL {url!r}: expected s3://BUCKET/PREFIX, with a valid "
                             "bucket name (3-63 of a-z 0-9 . -)")
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.url = f"s3://{bucket}/{prefix}".rstrip("/")
        self._config = config
        self._endpoint = os.environ.get("STICKYCI_S3_ENDPOINT") or None
        self.cache_scope = f"{self.url}@{self._endpoint or 'aws'}"  # one bucket name, two services
        self._conditional = conditional_writes
        self._bucket_checked = False
        self._pid = -1
        self._client: S3Client | None = None
        self._lock_pid, self._lock = os.getpid(), threading.RLock()

    def _guard(self) -> threading.RLock:
        # A fork may copy the lock while a parent thread holds it: a child starts a fresh one.
        if self._lock_pid != os.getpid():
            self._lock_pid, self._lock = os.getpid(), threading.RLock()
        return self._lock

    @property
    def _s3(self) -> S3Client:
        # A forked store worker must not share the parent's pooled sockets: one client per pid.
        # Creating one takes ~0.2 s of CPU, so threads that arrive together wait for the first.
        if self._client is None or self._pid != os.getpid():
            with self._guard():
                if self._client is None or self._pid != os.getpid():
                    self._client, self._pid = self._make_client(), os.getpid()
        return self._client

    def _make_client(self) -> S3Client:
        session = botocore.session.get_session()  # reads the environment and ~/.aws afresh
        mode = session.get_config_variable("retry_mode")
        config = Config(
            max_pool_connections=POOL_SIZE, connect_timeout=5, read_timeout=60,
            tcp_keepalive=True,
            # "legacy" mode also retries errors that will never succeed; insist on a modern one.
            retries={"mode": "adaptive" if mode == "adaptive" else "standard",
                     "total_max_attempts": int(session.get_config_variable("max_attempts") or 5)},
            # Non-AWS services rarely have wildcard DNS for virtual-hosted buckets.
            s3={"addressing_style": "path"} if self._endpoint else None,
        )
        if self._config:
            config = config.merge(self._config)  # botocore semantics: its retries dict wins whole
        client = boto3.Session(botocore_session=session).client(
            "s3", endpoint_url=self._endpoint, config=config)
        client.meta.events.register_last("before-call.s3", _no_expect_header)
        return client

    def _key(self, name: str) -> str:
        return self.prefix + check_name(name)

    # --- errors -----------------------------------------------------------------------------

    def _where(self) -> str:
        # Not self._s3: creating a client is one of the things that can fail.
        return self._client.meta.endpoint_url if self._client else self._endpoint or "AWS S3"

    def _error(self, exc: Exception, op: str, name: str) -> Exception:
        where = self._where()
        if isinstance(exc, NoCredentialsError):
            return StoreMisconfigured(
                f"no AWS credentials for {self.url}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE",
                summary="the server has no credentials for its store")
        if isinstance(exc, BotoCoreError):
            detail = " ".join(str(exc).split())
            message = f"S3 {op} of {name} in {self.url} failed ({where}): {detail}"
            if isinstance(exc, _TRANSIENT_TRANSPORT) and not isinstance(exc, bx.SSLError):
                return StoreUnavailable(message)
            if isinstance(exc, _SETUP):
                return StoreMisconfigured(message)
            return BackendError(message)
        assert isinstance(exc, ClientError)
        code = _code(exc)
        if code == "NoSuchKey":
            return NotFound(f"store object {name} is missing from {self.url}")
        if code == "NoSuchBucket":
            return self._no_bucket()
        fix = "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
        if code in _BAD_CREDENTIALS:
            return StoreMisconfigured(
                f"S3 at {where} refused the credentials ({code}) for {op} of {name} in "
                f"{self.url}; {fix}", summary="the server's store refused its credentials")
        if code in _DENIED or code == "403":  # a HEAD's 403 has no body to say which
            return StoreMisconfigured(
                f"S3 at {where} refused the credentials ({code}) for {op} of {name} in "
                f"{self.url}; {fix}, and the bucket's policy",
                summary="the server's store denied it access" if code in _DENIED
                else "the server's store refused its credentials or denied it access")
        if code == "RequestTimeTooSkewed":
            return StoreMisconfigured(
                f"S3 at {where} refused {op} of {name} in {self.url}: this machine's clock is "
                "too far from the server's (RequestTimeTooSkewed); synchronise it (NTP)",
                summary="the server's clock is too far from its store's")
        message = " ".join(str(exc.response.get("Error", {}).get("Message", "")).split())
        # Named like a connection failure: which server answered is half of the diagnosis.
        text = f"S3 {op} of {name} in {self.url} failed ({where}): {code} {message}".strip()
        status = _status(exc)
        if code in _BUSY or (status >= 500 and status != 501):  # 501: a feature it lacks
            return StoreUnavailable(text)
        return BackendError(text)

    def _no_bucket(self) -> StoreMisconfigured:
        where = self._where()
        flag = "" if where.endswith(".amazonaws.com") else f" --endpoint-url {where}"
        return StoreMisconfigured(
            f"S3 bucket {self.bucket!r} does not exist at {where}; create it with "
            f"`aws s3 mb s3://{self.bucket}{flag}`",
            summary="the server's store has no bucket of the configured name")

    @contextlib.contextmanager
    def _boundary(self, op: str, name: str) -> Iterator[None]:
        try:
            yield
        except (BotoCoreError, ClientError) as exc:
            raise self._error(exc, op, name) from exc

    # --- the Backend protocol ---------------------------------------------------------------

    def put(self, name: str, data: bytes | memoryview) -> None:
        """Store a blob; a single PUT is atomic, so readers see the old or the new bytes."""
        key = self._key(name)
        with self._boundary("put", name):
            self._s3.put_object(Bucket=self.bucket, Key=key, Body=bytes(data))

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Read a blob, or a byte range of it with a Range request."""
        key = self._key(name)
        if length == 0:  # an empty range is not expressible; only existence matters
            if self.stat(name) is None:
                raise NotFound(f"store object {name} is missing from {self.url}")
            return b""
        end = "" if length is None else str(offset + length - 1)
        rng = f"bytes={offset}-{end}" if offset or length is not None else ""
        with self._boundary("get", name):
            try:
                resp = (self._s3.get_object(Bucket=self.bucket, Key=key, Range=rng) if rng
                        else self._s3.get_object(Bucket=self.bucket, Key=key))
            except ClientError as exc:
                if _code(exc) != "InvalidRange":
                    raise
                return b""  # the object exists but ends before offset, as a short read would
            return resp["Body"].read()

    def stat(self, name: str) -> Stat | None:
        """Size and mtime from a HEAD request, or None."""
        key = self._key(name)
        with self._boundary("stat", name):
            try:
                head = self._s3.head_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if _code(exc) not in _MISSING:
                    raise
                self._check_bucket()  # a 404 HEAD does not say whether the bucket is missing
                return None
        return Stat(head["ContentLength"], head["LastModified"].timestamp())

    def missing(self, names: Sequence[str]) -> list[str]:
        """Names with no object: S3 has no batch HEAD, so one HEAD each."""
        return [n for n in names if self.stat(n) is None]

    def list(self, namespace: str) -> list[str]:
        """Names under a namespace, one page (1000 keys) per request."""
        check_name(f"{namespace}/x")
        start = len(self.prefix)
        with self._boundary("list", namespace):
            pages = self._s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=f"{self.prefix}{namespace}/", Delimiter="/")
            # Filer-backed servers (SeaweedFS) list an emptied "directory" as a key of its own
            # ending in "/"; it is no blob.
            return [o["Key"][start:] for page in pages for o in page.get("Contents", [])
                    if not o["Key"].endswith("/")]

    def list_stats(self, namespace: str) -> dict[str, Stat]:
        """Names under a namespace with their size and mtime, from the listing itself (gc's
        listing: no HEAD per blob)."""
        check_name(f"{namespace}/x")
        start = len(self.prefix)
        with self._boundary("list", namespace):
            pages = self._s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=f"{self.prefix}{namespace}/", Delimiter="/")
            return {o["Key"][start:]: Stat(o["Size"], o["LastModified"].timestamp())
                    for page in pages for o in page.get("Contents", [])
                    if not o["Key"].endswith("/")}

    def delete(self, name: str) -> None:
        """Remove a blob; S3 deletes of absent keys succeed."""
        key = self._key(name)
        with self._boundary("delete", name):
            try:
                self._s3.delete_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if _code(exc) not in _MISSING:  # some S3-compatible servers answer 404
                    raise

    def read_versioned(self, name: str) -> tuple[bytes, str] | None:
        """Content and ETag, or None."""
        key = self._key(name)
        with self._boundary("read", name):
            try:
                resp = self._s3.get_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if _code(exc) != "NoSuchKey":
                    raise
                return None
            return resp["Body"].read(), resp["ETag"]

    def put_if(self, name: str, data: bytes, etag: str | None) -> bool:
        """Compare-and-swap by conditional write, or under a lease on servers without one.

        A 412 on a retried attempt is ambiguous (the first attempt may have landed); it is
        reported as a lost race, and the caller's re-read shows what the object now holds.
        """
        key = self._key(name)
        if not self._conditional_writes():
            return self._put_leased(name, data, etag)
        with self._boundary("put_if", name):
            try:
                self._put_conditional(key, data, etag)
            except ClientError as exc:
                # AWS answers If-Match on a deleted key with NoSuchKey, others with 412.
                if _code(exc) in _LOST_RACE or (etag is not None and _code(exc) == "NoSuchKey"):
                    return False
                raise
        return True

    def _put_conditional(self, key: str, data: bytes, etag: str | None) -> None:
        if etag is None:
            self._s3.put_object(Bucket=self.bucket, Key=key, Body=data, IfNoneMatch="*")
        else:
            self._s3.put_object(Bucket=self.bucket, Key=key, Body=data, IfMatch=etag)

    # --- bucket check, probe and lease ------------------------------------------------------

    def _check_bucket(self) -> None:
        if self._bucket_checked:
            return
        try:
            self._s3.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _code(exc) in ("404", "NoSuchBucket"):
                raise self._no_bucket() from exc
            raise
        self._bucket_checked = True

    def _conditional_writes(self) -> bool:
        with self._guard():
            if self._conditional is None:
                self._conditional = self._probe()
                if not self._conditional:
                    log.info("S3 server %s ignores conditional writes (If-Match/If-None-Match); "
                             "%s uses lease objects under %s.locks/ for compare-and-swap",
                             self._where(), self.url, self.prefix)
            return self._conditional

    def _probe(self) -> bool:
        # Servers that do not know the headers ignore them: a second create-only write and a
        # write against a wrong ETag must both be refused.
        key = f"{self.prefix}.locks/probe-{uuid.uuid4().hex}"
        refused = 0
        with self._boundary("probe", key):
            try:
                self._s3.put_object(Bucket=self.bucket, Key=key, Body=b"")
                for etag in (None, '"0"'):
                    try:
                        self._put_conditional(key, b"", etag)
                    except ClientError as exc:
                        if _code(exc) not in _LOST_RACE:
                            raise
                        refused += 1
                return refused == 2
            except ClientError as exc:
                if _code(exc) != "NotImplemented":  # 501: a server that rejects the headers
                    raise
                return False
            finally:
                with contextlib.suppress(BotoCoreError, ClientError):
                    self._s3.delete_object(Bucket=self.bucket, Key=key)

    def _put_leased(self, name: str, data: bytes, etag: str | None) -> bool:
        with self._lease(name), self._boundary("put_if", name):
            try:
                current = self._s3.head_object(Bucket=self.bucket, Key=self._key(name))["ETag"]
            except ClientError as exc:
                if _code(exc) not in _MISSING:
                    raise
                current = None
            if current != etag:
                return False
            self._s3.put_object(Bucket=self.bucket, Key=self._key(name), Body=data)
            return True

    @contextlib.contextmanager
    def _lease(self, name: str) -> Iterator[None]:
        # Without an atomic create, the last writer of the lease wins: write, let racing
        # writers land (LEASE_SETTLE), re-read, and only the writer still named proceeds.
        key = f"{self.prefix}.locks/{name}.lease"
        owner = uuid.uuid4().hex
        deadline = time.monotonic() + LEASE_WAIT
        while True:
            held = self._read_lease(key)
            if held is None or held[1] < time.time():
                body = json.dumps({"owner": owner, "expires": time.time() + LEASE_TTL})
                with self._boundary("lease", name):
                    self._s3.put_object(Bucket=self.bucket, Key=key, Body=body.encode())
                time.sleep(LEASE_SETTLE)
                held = self._read_lease(key)
                if held is not None and held[0] == owner:
                    break
            if time.monotonic() > deadline:
                raise StoreUnavailable(
                    f"the lease on {name} in {self.url} was held for over {LEASE_WAIT:.0f} s; "
                    f"delete {key} if no writer is alive",
                    summary="the server's store is busy with another writer of the same ref")
            time.sleep(random.uniform(0.02, 0.1))  # jitter, so waiters do not move in step
        try:
            yield
        finally:
            held = self._read_lease(key)
            if held is not None and held[0] == owner:  # never release a lease we lost
                with self._boundary("lease", name):
                    self._s3.delete_object(Bucket=self.bucket, Key=key)

    def _read_lease(self, key: str) -> tuple[str, float] | None:
        with self._boundary("lease", key):
            try:
                body = self._s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            except ClientError as exc:
                if _code(exc) != "NoSuchKey":
                    raise
                return None
        try:
            lease = json.loads(body)
            return str(lease["owner"]), float(lease["expires"])
        except (ValueError, KeyError, TypeError):
            return "", 0.0  # unreadable: treat as expired, so it is broken, not waited on
