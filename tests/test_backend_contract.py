"""One backend contract, restic-style: every store backend passes the same tests unchanged.

Backends: ``file://`` (a temp dir), ``s3://`` on a real SeaweedFS (``seaweed.py``), and
``http://``: a real ``stickyci serve`` (``server.py``) over a ``file://`` store, reached both
directly and, as runners reach it, through a local tier. The compare-and-swap tests also run
``s3://`` forced onto its lease fallback. Then an end-to-end snapshot through S3, and the S3
faults: missing bucket, refused credentials, a killed server.

Blobs are named as the object store names them: a pack by the BLAKE3 of its bytes, an index
with a valid checksum. The server verifies both on upload (and refuses anything else with 400,
see ``test_server.py``); the other backends do not care what the bytes are.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shutil
import signal
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from botocore.config import Config
from seaweed import Seaweed, SeaweedUnavailable, start_seaweed
from server import Server, start_server

from stickyci.digest import Digest
from stickyci.errors import NotFound, StoreMisconfigured, StoreUnavailable, UsageError
from stickyci.snapshot import load_manifest, restore, snapshot_tree
from stickyci.store import LocalBackend, ObjectStore
from stickyci.store.backend import Backend
from stickyci.store.http import HttpBackend
from stickyci.store.objects import encode_index
from stickyci.store.retry import RetryBackend
from stickyci.store.s3 import S3Backend
from stickyci.store.tier import TieredBackend

Factory = Callable[[], Backend]
MiB = 1 << 20


def pack(data: bytes) -> str:
    """The name the object store gives a pack of ``data``."""
    return f"packs/{Digest.of(data).hex}"


def index_blob(entries: int) -> bytes:
    """A well-formed pack index of ``entries`` entries (44 bytes each, 36 of framing)."""
    return encode_index((Digest.of(b"%d" % i), i, 1) for i in range(entries))


@pytest.fixture
def s3_env(seaweed: Seaweed,
           monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Seaweed:
    """The standard AWS configuration pointing at the test server, and nothing from ~/.aws."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                "AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", seaweed.region)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no credential probe of 169.254…
    monkeypatch.setenv("STICKYCI_S3_ENDPOINT", seaweed.endpoint)
    return seaweed


@pytest.fixture(scope="module")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    """One server for the module (a start costs most of a second) and a token that may do
    everything; each test empties its store first."""
    with start_server(tmp_path_factory.mktemp("http")) as server:
        yield server, server.token("--read", "*", "--write", "*", "--delete", "*", "--admin")


def _factory(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Factory:
    """Independent backend instances on one store, like separate processes would open."""
    if kind == "file":
        return lambda: LocalBackend(tmp_path / "store")
    if kind.startswith("http"):
        server, token = request.getfixturevalue("http_server")
        root = Path(server.store_url.removeprefix("file://"))
        for ns in root.iterdir() if root.exists() else ():
            if ns.name != "tmp":  # the server's backend keeps its temp dir for its lifetime
                shutil.rmtree(ns)
        # Composed as open_backend composes them: retries around the one-request client.
        if kind == "http":
            return lambda: RetryBackend(HttpBackend(server.url, token))
        tier = LocalBackend(tmp_path / "tier")  # one machine's tier, shared by its processes
        return lambda: TieredBackend(tier, RetryBackend(HttpBackend(server.url, token)), 1 << 30)
    server: Seaweed = request.getfixturevalue("s3_env")
    url = f"s3://{server.bucket}/t-{uuid.uuid4().hex}"  # a fresh prefix: tests stay apart
    conditional = False if kind == "s3-lease" else None
    return lambda: S3Backend(url, conditional_writes=conditional)


@pytest.fixture(params=["file", "s3", "http", "http-tiered"])
def new_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Factory:
    return _factory(request.param, request, tmp_path)


@pytest.fixture
def backend(new_backend: Factory) -> Backend:
    return new_backend()


@pytest.fixture(params=["file", "s3", "s3-lease", "http", "http-tiered"])
def new_cas_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Factory:
    return _factory(request.param, request, tmp_path)


# --- the contract -------------------------------------------------------------------------


def test_put_get_round_trip(backend: Backend) -> None:
    blobs = {pack(data): data for data in (b"", b"hello", os.urandom(5 * MiB + 3))}
    for name, data in blobs.items():
        backend.put(name, data)
    for name, data in blobs.items():
        assert backend.get(name) == data
    backend.put(pack(b"from a view"), memoryview(b"from a view"))
    assert backend.get(pack(b"from a view")) == b"from a view"


def test_ranged_get(backend: Backend) -> None:
    data = os.urandom(300_000)
    name = pack(data)
    backend.put(name, data)
    assert backend.get(name, 0, 10) == data[:10]
    assert backend.get(name, 123_456, 7_000) == data[123_456:130_456]
    assert backend.get(name, 299_000) == data[299_000:]
    assert backend.get(name, 299_990, 100) == data[299_990:]  # a short read at the end
    assert backend.get(name, 300_000) == b""
    assert backend.get(name, 5, 0) == b""


def test_get_of_a_missing_name_is_not_found(backend: Backend) -> None:
    for args in ((), (10,), (0, 5), (0, 0)):
        with pytest.raises(NotFound, match="packs/nope"):
            backend.get("packs/nope", *args)
    assert backend.read_versioned("packs/nope") is None


def test_stat(backend: Backend) -> None:
    assert backend.stat("index/a") is None
    backend.put("index/a", index_blob(27))
    st = backend.stat("index/a")
    assert st is not None and st.size == 36 + 27 * 44
    assert abs(st.mtime - time.time()) < 300


def test_list_a_namespace(backend: Backend) -> None:
    assert backend.list("refs") == []
    for name in ("refs/a", "refs/b.1"):
        backend.put(name, b"x")
    backend.put("index/c", index_blob(1))
    assert sorted(backend.list("refs")) == ["refs/a", "refs/b.1"]
    assert backend.list("index") == ["index/c"]


def test_list_spans_many_pages(backend: Backend) -> None:
    names = {f"index/{i:05d}" for i in range(1100)}  # S3 lists at most 1000 keys per page
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda n: backend.put(n, index_blob(0)), names))
    assert set(backend.list("index")) == names


def test_delete_is_idempotent(backend: Backend) -> None:
    name = pack(b"x")
    backend.put(name, b"x")
    backend.delete(name)
    backend.delete(name)
    backend.delete("packs/never")
    assert backend.stat(name) is None
    with pytest.raises(NotFound):
        backend.get(name)
    assert backend.list("packs") == []  # an emptied namespace lists nothing, not a marker


def test_put_replaces(backend: Backend) -> None:
    backend.put("refs/r", b"old content")
    backend.put("refs/r", b"new")
    assert backend.get("refs/r") == b"new"
    st = backend.stat("refs/r")
    assert st is not None and st.size == 3


BAD_NAMES = ["", "refs", "refs/", "/etc/passwd", "refs/../x", "Refs/x", "refs/a/b",
             "refs/.hidden", "refs/a b", "../refs/x", "refs/" + "a" * 300]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_invalid_names_are_refused_before_any_request(
        name: str, new_backend: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    # Any request would go to a closed port and fail with BackendError, not UsageError.
    monkeypatch.setenv("STICKYCI_S3_ENDPOINT", "http://127.0.0.1:9")
    backend = new_backend()
    calls: list[Callable[[], object]] = [
        lambda: backend.put(name, b"x"), lambda: backend.get(name),
        lambda: backend.get(name, 1, 2), lambda: backend.stat(name),
        lambda: backend.delete(name), lambda: backend.read_versioned(name),
        lambda: backend.put_if(name, b"x", None), lambda: backend.put_if(name, b"x", "e"),
    ]
    for call in calls:
        with pytest.raises(UsageError):
            call()


@pytest.mark.parametrize("namespace", ["", "Refs", "../refs", "refs/x", "re fs"])
def test_invalid_namespaces_are_refused(namespace: str, new_backend: Factory,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STICKYCI_S3_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(UsageError):
        new_backend().list(namespace)


def test_put_if_create_only_succeeds_once(new_cas_backend: Factory) -> None:
    backend = new_cas_backend()
    assert backend.put_if("refs/k", b"first", None)
    assert not backend.put_if("refs/k", b"second", None)
    assert backend.get("refs/k") == b"first"


def test_put_if_compares_the_etag(new_cas_backend: Factory) -> None:
    backend = new_cas_backend()
    backend.put("refs/k", b"v1")
    v1 = backend.read_versioned("refs/k")
    assert v1 is not None and v1[0] == b"v1"
    assert backend.put_if("refs/k", b"v2", v1[1])
    assert not backend.put_if("refs/k", b"v3", v1[1])  # stale: someone moved it since
    v2 = backend.read_versioned("refs/k")
    assert v2 is not None and v2[0] == b"v2" and v2[1] != v1[1]
    assert backend.put_if("refs/k", b"v3", v2[1])
    assert backend.get("refs/k") == b"v3"


def test_put_if_on_a_deleted_name(new_cas_backend: Factory) -> None:
    backend = new_cas_backend()
    backend.put("refs/k", b"v1")
    v1 = backend.read_versioned("refs/k")
    assert v1 is not None
    backend.delete("refs/k")
    assert not backend.put_if("refs/k", b"v2", v1[1])
    assert backend.stat("refs/k") is None
    assert backend.put_if("refs/k", b"v2", None)


def test_racing_put_if_loses_no_update(new_cas_backend: Factory,
                                       request: pytest.FixtureRequest) -> None:
    threads = 8
    # The lease serialises every write behind a settle delay: fewer rounds keep it quick.
    lease = request.node.callspec.params["new_cas_backend"] == "s3-lease"
    rounds = 3 if lease else 10
    new_cas_backend().put("refs/counter", b"0")

    def increment(_: int) -> int:
        backend, lost = new_cas_backend(), 0
        for _ in range(rounds):
            while True:
                current = backend.read_versioned("refs/counter")
                assert current is not None
                if backend.put_if("refs/counter", b"%d" % (int(current[0]) + 1), current[1]):
                    break
                lost += 1
        return lost

    with ThreadPoolExecutor(threads) as pool:
        lost = sum(pool.map(increment, range(threads)))
    assert new_cas_backend().get("refs/counter") == b"%d" % (threads * rounds)
    assert lost > 0 or lease  # the threads really did race


# --- end to end through S3 ----------------------------------------------------------------


def _make_tree(root: Path) -> None:
    (root / "src" / "deep").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "README").write_text("hello\n")
    (root / "empty").write_bytes(b"")
    (root / "src" / "deep" / "big.bin").write_bytes(os.urandom(3 * MiB))
    (root / "src" / "zeros").write_bytes(bytes(2 * MiB))
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    (root / "link").symlink_to("src/deep/big.bin")


def _describe(root: Path) -> dict[str, tuple[int, bytes]]:
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            body = os.readlink(path).encode()
        elif stat.S_ISREG(st.st_mode):
            body = path.read_bytes()
        else:
            body = b""
        out[str(path.relative_to(root))] = (st.st_mode, body)
    return out


@pytest.mark.parametrize("forked", [False, True], ids=["threads", "forked-workers"])
def test_snapshot_round_trips_through_s3(s3_env: Seaweed, tmp_path: Path, forked: bool,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    if forked:  # as a big tree would: forked workers, each needing its own connections
        for module in ("stickyci.snapshot.build", "stickyci.snapshot.restore"):
            monkeypatch.setattr(importlib.import_module(module), "PARALLEL_MIN_BYTES", 0)
    url = f"s3://{s3_env.bucket}/e2e-{uuid.uuid4().hex}"
    src, dst = tmp_path / "src", tmp_path / "dst"
    _make_tree(src)
    snapshot, _ = snapshot_tree(ObjectStore(S3Backend(url)), str(src))
    reader = ObjectStore(S3Backend(url))  # a fresh reader: index and manifest from S3
    dst.mkdir()
    restore(reader, load_manifest(reader, snapshot), str(dst))
    assert _describe(dst) == _describe(src)
    assert S3Backend(url).list("packs")


def test_a_server_ignoring_conditional_writes_gets_a_lease(
        s3_env: Seaweed, caplog: pytest.LogCaptureFixture) -> None:
    backend = S3Backend(f"s3://{s3_env.bucket}/old-{uuid.uuid4().hex}")

    def like_an_old_server(params: dict[str, Any], **_: Any) -> None:
        params.pop("IfMatch", None)
        params.pop("IfNoneMatch", None)

    backend._s3.meta.events.register("before-parameter-build.s3.PutObject", like_an_old_server)
    with caplog.at_level(logging.INFO, logger="stickyci.store.s3"):
        assert backend.put_if("refs/k", b"1", None)
        assert not backend.put_if("refs/k", b"2", None)
        current = backend.read_versioned("refs/k")
        assert current is not None and current[0] == b"1"
        assert not backend.put_if("refs/k", b"2", '"stale"')
        assert backend.put_if("refs/k", b"2", current[1])
    assert backend.get("refs/k") == b"2"
    notes = [r for r in caplog.records if "ignores conditional writes" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.INFO
    assert backend.list("refs") == ["refs/k"]  # leases live outside every namespace


# --- S3 faults ----------------------------------------------------------------------------


def test_missing_bucket_is_a_misconfigured_store_naming_it(s3_env: Seaweed) -> None:
    backend = S3Backend("s3://stickyci-no-such-bucket/p")
    calls: list[Callable[[], object]] = [
        lambda: backend.put("refs/a", b"x"), lambda: backend.get("refs/a"),
        lambda: backend.stat("refs/a"), lambda: backend.list("refs"),
        lambda: backend.read_versioned("refs/a"), lambda: backend.put_if("refs/a", b"x", None),
    ]
    for call in calls:
        with pytest.raises(StoreMisconfigured, match=r"'stickyci-no-such-bucket'.*aws s3 mb"):
            call()


@pytest.mark.parametrize("var", ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"])
def test_wrong_credentials_are_reported(s3_env: Seaweed, var: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(var, "wrong-" + uuid.uuid4().hex[:8])
    backend = S3Backend(f"s3://{s3_env.bucket}/creds")
    calls: list[Callable[[], object]] = [
        lambda: backend.put("refs/a", b"x"), lambda: backend.get("refs/a"),
        lambda: backend.stat("refs/a"), lambda: backend.list("refs"),
        lambda: backend.put_if("refs/a", b"x", None),
    ]
    for call in calls:
        with pytest.raises(StoreMisconfigured, match="refused the credentials"):
            call()


def test_missing_credentials_are_reported(s3_env: Seaweed,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StoreMisconfigured, match="no AWS credentials"):
        S3Backend(f"s3://{s3_env.bucket}/creds").get("refs/a")


def test_killed_server_is_a_backend_error_not_a_hang(s3_env: Seaweed, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(start_seaweed(tmp_path / "doomed"))
        except SeaweedUnavailable as exc:
            pytest.skip(f"a second SeaweedFS did not start: {exc}")
        monkeypatch.setenv("STICKYCI_S3_ENDPOINT", server.endpoint)
        config = Config(retries={"mode": "standard", "total_max_attempts": 2},
                        connect_timeout=1, read_timeout=1)
        backend = S3Backend(f"s3://{server.bucket}/k", config=config)
        backend.put("refs/a", b"x")
        calls: list[Callable[[], object]] = [
            lambda: backend.get("refs/a"), lambda: backend.put("refs/b", b"y"),
            lambda: backend.list("refs"), lambda: backend.put_if("refs/a", b"z", None)]
        # Frozen first: connections are accepted by the kernel but never answered.
        os.kill(server.process.pid, signal.SIGSTOP)
        _fails_quickly(calls[0], "timeout")
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait()
        for call in calls:
            _fails_quickly(call, "failed")


def _fails_quickly(call: Callable[[], object], match: str) -> None:
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match=match):  # transient: a client retries it
        call()
    assert time.monotonic() - started < 8  # two attempts with a backoff, then an answer
