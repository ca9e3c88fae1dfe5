"""The ``http://`` client against the server in process: routing, auth, views, retries.

``HttpBackend`` takes any ``httpx2.Client``, and Starlette's ``TestClient`` is one that calls the
ASGI app directly, so these tests need no port, no subprocess and no sleep where a real socket
adds nothing. What only a socket shows (a server killed mid-upload, a restart, a proxy dropping
a connection) stays in ``test_server_faults.py``. One fault here cannot happen in process for
real and is injected on purpose: an answer lost after the server applied the request, which
the response hook ``drop_answers`` stands in for.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
import pytest
from starlette.testclient import TestClient

from stickyci.digest import Digest
from stickyci.disks import DiskRef, Generation
from stickyci.errors import (
    AuthError,
    BackendError,
    Forbidden,
    NotFound,
    StoreMisconfigured,
    StoreUnavailable,
)
from stickyci.server.app import ServerConfig, create_app
from stickyci.server.auth import TokenStore
from stickyci.snapshot import Entry, Manifest, save_manifest
from stickyci.snapshot.model import FILE
from stickyci.store import LocalBackend, ObjectStore
from stickyci.store import protocol as p
from stickyci.store.http import HttpBackend
from stickyci.store.objects import index_is_partial
from stickyci.store.retry import RetryBackend
from stickyci.store.tier import TieredBackend

URL = "http://testserver"


def pack(data: bytes) -> str:
    """The name the object store gives a pack of ``data``."""
    return f"packs/{Digest.of(data).hex}"


class FlakyStore(LocalBackend):
    """The server's ``file://`` store, failing its next ``failures`` versioned reads."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.failures: list[Exception] = []

    def read_versioned(self, name: str) -> tuple[bytes, str] | None:
        """Raise the next queued failure, if any, else read."""
        if self.failures:
            raise self.failures.pop(0)
        return super().read_versioned(name)


@dataclass
class InProcess:
    """A server app behind a test client, its store, its tokens, and the requests it saw."""

    client: TestClient
    store: FlakyStore
    tokens: TokenStore
    admin: str
    seen: list[httpx2.Request] = field(default_factory=list)

    def backend(self, token: str | None = None) -> HttpBackend:
        """A one-request-a-call client sending ``token`` (the admin's when omitted)."""
        return HttpBackend(URL, self.admin if token is None else token, client=self.client)

    def token(self, *, read: list[str], write: list[str]) -> str:
        """A token scoped to these key patterns."""
        return self.tokens.create(read=read, write=write)[0]

    def routes(self) -> list[tuple[str, str]]:
        """Method and path of each request so far, and forget them."""
        out = [(r.method, r.url.path) for r in self.seen]
        self.seen.clear()
        return out


@pytest.fixture
def served(tmp_path: Path) -> Iterator[InProcess]:
    cfg = ServerConfig(store_url=f"file://{tmp_path / 'store'}", state_dir=tmp_path / "state")
    tokens = TokenStore(cfg.state_dir)
    admin, _ = tokens.create(name="admin", admin=True)
    store = FlakyStore(tmp_path / "store")
    with TestClient(create_app(cfg, store)) as client:
        served = InProcess(client, store, tokens, admin)
        client.event_hooks["request"].append(served.seen.append)
        yield served


def disk_ref(key: str, snapshot: Digest, gen: int = 1) -> bytes:
    """A ref for disk ``key`` whose generation ``gen`` is ``snapshot``."""
    now = time.time()
    return DiskRef(key, now, now, [Generation(gen, snapshot, now, 5, 1, 1, "test")]).encode()


# --- routing ------------------------------------------------------------------------------------


def test_each_call_is_one_request_on_its_route(served: InProcess) -> None:
    backend = served.backend()
    data = b"hello over no socket"
    name = pack(data)
    blob = f"{p.PREFIX}/blobs/{name}"
    backend.put(name, memoryview(data))
    assert served.routes() == [("PUT", blob)]
    assert backend.get(name) == data
    assert backend.get(name, 6, 4) == data[6:10]
    assert backend.get(name, 6) == data[6:]
    assert served.routes() == [("GET", blob)] * 3
    stat = backend.stat(name)
    assert stat is not None and stat.size == len(data)
    assert served.routes() == [("HEAD", blob)]
    absent = pack(b"never stored")
    assert backend.missing([name, absent]) == [absent]
    assert backend.list("packs") == [name]
    assert served.routes() == [("POST", f"{p.PREFIX}/missing"), ("GET", f"{p.PREFIX}/list/packs")]
    with pytest.raises(NotFound, match=absent):
        backend.get(absent)
    assert backend.stat(absent) is None
    served.routes()
    backend.delete(name)
    assert served.routes() == [("DELETE", blob)]
    assert backend.stat(name) is None


def test_ranges_and_the_token_travel_as_headers(served: InProcess) -> None:
    backend = served.backend()
    data = bytes(range(200))
    name = pack(data)
    backend.put(name, data)
    served.seen.clear()
    assert backend.get(name, 10, 5) == data[10:15]
    assert backend.get(name, 190) == data[190:]
    assert backend.get(name, 3, 0) == b""  # asks only whether the blob exists
    assert [(r.method, r.headers.get("range")) for r in served.seen] == [
        ("GET", "bytes=10-14"), ("GET", "bytes=190-"), ("HEAD", None)]
    assert {r.headers["authorization"] for r in served.seen} == {f"Bearer {served.admin}"}
    with pytest.raises(NotFound):
        backend.get(pack(b"absent"), 0, 0)


def test_compare_and_swap_on_refs(served: InProcess) -> None:
    backend = served.backend()
    snap = save_manifest(ObjectStore(backend, load_index=False), Manifest({}))
    v1, v2 = disk_ref("cas", snap), disk_ref("cas", snap, 2)
    assert backend.put_if("refs/cas", v1, None)
    assert not backend.put_if("refs/cas", v2, None)  # exists already
    current = backend.read_versioned("refs/cas")
    assert current is not None and current[0] == v1
    served.seen.clear()
    assert backend.put_if("refs/cas", v2, current[1])
    assert not backend.put_if("refs/cas", v1, current[1])  # stale etag: a lost race
    assert [(r.method, r.url.path, r.headers.get("if-match")) for r in served.seen] == [
        ("PUT", f"{p.PREFIX}/blobs/refs/cas", current[1])] * 2
    assert backend.read_versioned("refs/nothing") is None
    assert backend.list("refs") == ["refs/cas"]


# --- auth ---------------------------------------------------------------------------------------


def test_refusals_of_the_token_are_not_retried(served: InProcess,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STICKYCI_TOKEN", raising=False)
    name = pack(b"x")
    for token, match in ((None, "needs a token"), ("sci_0_nope", "not valid")):
        served.seen.clear()
        with pytest.raises(AuthError, match=match) as caught:
            RetryBackend(HttpBackend(URL, token, client=served.client), window=30).get(name)
        assert f"stickyci server {URL} reading {name}" in str(caught.value)
        assert len(served.seen) == 1  # 401: every attempt would get the same answer
        sent = served.seen[0].headers.get("authorization")
        assert sent == (None if token is None else f"Bearer {token}")


def test_a_scoped_token_is_refused_other_scopes_with_403(served: InProcess) -> None:
    admin = served.backend()
    snap = save_manifest(ObjectStore(admin, load_index=False), Manifest({}))
    assert admin.put_if("refs/team-a-x", disk_ref("team-a-x", snap), None)
    team_b = RetryBackend(served.backend(served.token(read=["team-b-*"], write=["team-b-*"])),
                          window=30)
    served.seen.clear()
    with pytest.raises(Forbidden):
        team_b.read_versioned("refs/team-a-x")
    with pytest.raises(Forbidden):
        team_b.put_if("refs/team-a-y", disk_ref("team-a-y", snap), None)
    assert len(served.seen) == 2  # 403s, each answered once
    assert team_b.list("refs") == []  # the listing shows only what the token may read
    own = ObjectStore(team_b, load_index=False)
    mine = save_manifest(own, Manifest({"f": Entry("f", FILE, 0o644, 0, size=6, chunks=[
        [own.put(b"team b").hex, 6]])}))
    assert team_b.put_if("refs/team-b-x", disk_ref("team-b-x", mine), None)


# --- partial views and the local tier -----------------------------------------------------------


def test_a_partial_index_is_served_as_such_and_never_kept_in_the_tier(
        served: InProcess, tmp_path: Path) -> None:
    admin = served.backend()
    store = ObjectStore(admin, load_index=False)
    m = Manifest({"f": Entry("f", FILE, 0o644, 0, size=6, chunks=[[store.put(b"secret").hex, 6]])})
    snap = save_manifest(store, m)
    assert admin.put_if("refs/team-a-x", disk_ref("team-a-x", snap), None)
    [index] = admin.list("index")
    token_b = served.token(read=["team-b-*"], write=["team-b-*"])
    team_b = served.backend(token_b)

    served.seen.clear()
    tier_b = TieredBackend(LocalBackend(tmp_path / "tier-b"), RetryBackend(team_b), 1 << 30)
    view = tier_b.get(index)
    assert index_is_partial(view)
    assert served.seen[-1].url.path == f"{p.PREFIX}/blobs/{index}"
    answer = served.client.get(f"{p.PREFIX}/blobs/{index}",
                               headers={"authorization": f"Bearer {token_b}"})
    assert answer.headers[p.VIEW_HEADER] == "partial" and answer.content == view
    assert not (tmp_path / "tier-b" / index).exists()
    assert tier_b.get(index) == view and len(served.routes()) == 3  # asked again each time

    tier_a = TieredBackend(LocalBackend(tmp_path / "tier-a"), RetryBackend(admin), 1 << 30)
    whole = tier_a.get(index)
    assert not index_is_partial(whole)
    assert (tmp_path / "tier-a" / index).read_bytes() == whole


# --- retries ------------------------------------------------------------------------------------


def test_a_503_is_one_attempt_here_and_retried_by_the_wrapper(served: InProcess) -> None:
    admin = served.backend()
    snap = save_manifest(ObjectStore(admin, load_index=False), Manifest({}))
    ref = disk_ref("away", snap)
    assert admin.put_if("refs/away", ref, None)
    served.store.failures = [StoreUnavailable("the bucket is away")]
    served.seen.clear()
    with pytest.raises(StoreUnavailable) as caught:
        admin.read_versioned("refs/away")
    message = str(caught.value)
    assert f"stickyci server {URL} failed reading refs/away" in message
    assert "request id" in message and "bucket" not in message  # the server's words only
    assert len(served.seen) == 1

    served.store.failures = [StoreUnavailable("away")] * 3
    served.seen.clear()
    current = RetryBackend(admin, window=30).read_versioned("refs/away")
    assert current is not None and current[0] == ref
    assert len(served.seen) == 4

    served.store.failures = [StoreUnavailable("away")] * 3
    served.seen.clear()
    with pytest.raises(StoreUnavailable, match="request id"):
        RetryBackend(admin, window=0).read_versioned("refs/away")  # 0: one attempt
    assert len(served.seen) == 1


def test_a_permanent_server_error_fails_at_once(served: InProcess) -> None:
    served.store.failures = [BackendError("the disk said EIO")]
    served.seen.clear()
    with pytest.raises(BackendError, match=f"stickyci server {URL} reading refs/k") as caught:
        RetryBackend(served.backend(), window=30).read_versioned("refs/k")
    assert "request id" in str(caught.value) and "EIO" not in str(caught.value)
    assert len(served.seen) == 1


def test_a_window_is_a_deadline(served: InProcess) -> None:
    served.store.failures = [StoreUnavailable("away")] * 1000
    served.seen.clear()
    start = time.monotonic()
    with pytest.raises(StoreUnavailable):
        RetryBackend(served.backend(), window=0.5).read_versioned("refs/k")
    assert time.monotonic() - start < 0.5 + 2.0  # at most one backoff past the window
    assert 2 <= len(served.seen) < 20


def test_a_server_that_is_not_stickyci_is_misconfigured_not_empty() -> None:
    seen: list[httpx2.Request] = []

    def not_found(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return httpx2.Response(404, text="<html>no such page</html>",
                              headers={"content-type": "text/html"})

    client = httpx2.Client(transport=httpx2.MockTransport(not_found))
    backend = RetryBackend(HttpBackend("http://elsewhere:8080", "t", client=client), window=30)
    with pytest.raises(StoreMisconfigured, match="http://elsewhere:8080 is not a stickyci server"):
        backend.stat(pack(b"x"))
    assert len(seen) == 1


# --- a lost answer to a compare-and-swap (injected) ---------------------------------------------


@dataclass
class DropAnswers:
    """A response hook: once armed, the next ``count`` answers to ref writes never arrive.

    The server has applied the request by the time the hook runs, as when a connection drops
    after the write (a proxy restarting, a server killed before it answered).
    """

    count: int = 0
    dropped: int = 0

    def __call__(self, response: httpx2.Response) -> None:
        request = response.request
        if self.count and request.method == "PUT" and "/blobs/refs/" in request.url.path:
            self.count -= 1
            self.dropped += 1
            raise httpx2.ReadError("connection dropped before the answer", request=request)


@pytest.fixture
def drop_answers(served: InProcess) -> DropAnswers:
    hook = DropAnswers()
    served.client.event_hooks["response"].append(hook)
    return hook


def test_a_lost_answer_to_a_ref_update_is_not_a_lost_race(served: InProcess,
                                                          drop_answers: DropAnswers) -> None:
    once = served.backend()
    snap = save_manifest(ObjectStore(once, load_index=False), Manifest({}))
    v1, v2, v3 = (disk_ref("lost", snap, gen) for gen in (1, 2, 3))

    # One request a call: the lost answer is StoreUnavailable, though the write landed.
    drop_answers.count = 1
    with pytest.raises(StoreUnavailable, match="ReadError"):
        once.put_if("refs/lost", v1, None)
    current = once.read_versioned("refs/lost")
    assert current is not None and current[0] == v1

    # Retried: the second attempt loses to the first, and the read-back says it was ours.
    retried = RetryBackend(once, window=30)
    drop_answers.count = 1
    assert retried.put_if("refs/lost", v2, current[1])
    assert drop_answers.dropped == 2 and once.get("refs/lost") == v2

    # A stale etag whose answer was lost is a real loss: the blob holds another's bytes.
    drop_answers.count = 1
    assert not retried.put_if("refs/lost", v3, current[1])
    assert once.get("refs/lost") == v2

    # Without a lost answer a 409 needs no read-back: one request.
    served.seen.clear()
    assert not retried.put_if("refs/lost", v3, current[1])
    assert served.routes() == [("PUT", f"{p.PREFIX}/blobs/refs/lost")]
