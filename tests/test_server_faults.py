"""Faults at the server: unknown and malformed names, oversized bodies, racing ref updates,
a server killed mid-upload or restarted under a client, lost answers, a full store, and 16
committers racing one disk.

Every fault is real: a server subprocess killed with SIGKILL, a TCP proxy that drops an
answer, a tmpfs that fills up. Each must leave no half object and no moved ref behind, and
reach the CLI as one line with its documented exit code.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx2
import pytest
from helpers import Env, commit_tree, names, one_line_error, read_tree, tmpfs, wait_for
from server import Server, blob, error, free_port, pack, start_server, store_dir, unique

from stickyci.digest import Digest
from stickyci.disks.refs import DiskRef, Generation
from stickyci.errors import NotFound, StorageFull, TooLarge, UsageError
from stickyci.store import protocol as p
from stickyci.store.http import HttpBackend
from stickyci.store.retry import RetryBackend

MiB = 1 << 20


def disk_ref(key: str, gens: int = 1) -> bytes:
    now = time.time()
    return DiskRef(key, now, now, [Generation(g, Digest.of(b"%d" % g), now, 1, 1, 1, "t:1")
                                   for g in range(1, gens + 1)]).encode()


def remote(env: Env, url: str, token: str, cache: str, retry: float = 10) -> Env:
    """A runner of the server at ``url`` with its own cache dir."""
    cache_dir = env.root / cache
    environ = {**env.environ, "STICKYCI_STORE": url, "STICKYCI_TOKEN": token,
               "STICKYCI_CACHE_DIR": str(cache_dir), "STICKYCI_HTTP_RETRY_SECONDS": str(retry)}
    return Env(env.root, env.store, cache_dir, environ)


# --- unknown and malformed ---------------------------------------------------------------------

def test_unknown_objects_are_404(srv: Server, env: Env) -> None:
    c = srv.client()
    absent = pack(b"never stored")
    for r in (c.get(blob(absent)), c.get(blob(absent), headers={"range": "bytes=0-9"}),
              c.get(blob(f"index/{Digest.of(b'x').hex}")), c.get(blob("refs/no-such-disk")),
              c.get(f"{p.PREFIX}/versioned/refs/no-such-disk"),
              c.get(f"{p.PREFIX}/disks/no-such-disk")):
        assert r.status_code == 404 and error(r).kind == "NotFound", r.request.url
    assert c.head(blob(absent)).status_code == 404
    backend = HttpBackend(srv.url, srv.admin)
    with pytest.raises(NotFound, match=absent):
        backend.get(absent)
    assert backend.stat(absent) is None and backend.read_versioned("refs/no-such-disk") is None
    proc = remote(env, srv.url, srv.admin, "cache").run("disk", "show", "no-such-disk",
                                                        check=False)
    assert proc.returncode == 3 and "does not exist" in one_line_error(proc)


MALFORMED = [
    blob("packs/a%20b"), blob("Packs/x"), blob("nope/x"), blob("packs/" + "a" * 300),
    blob("refs/a/b"), blob("refs/-x"), blob("refs/.hidden"), blob("packs/..%2F..%2Fstate"),
    blob("refs/..%2Fstate%2Ftokens.json"), f"{p.PREFIX}/versioned/refs/a%20b",
    f"{p.PREFIX}/list/Refs", f"{p.PREFIX}/list/nope", f"{p.PREFIX}/disks/a%20b",
    "/cas/xyz", "/ac/" + "A" * 64, "/cas/" + "0" * 63, "/bad%20instance/ac/" + "0" * 64,
]


@pytest.mark.parametrize("path", MALFORMED)
def test_malformed_names_are_400(srv: Server, path: str) -> None:
    c = srv.client()
    methods = ["GET", "PUT"] if path.startswith((blob(""), "/cas/", "/ac/")) else ["GET"]
    for method in methods:
        r = c.request(method, httpx2.URL(srv.url + path), content=b"x" if method == "PUT" else None)
        assert r.status_code == 400, (method, r.text)
        assert error(r).kind == "UsageError"
    assert not (store_dir(srv).parent / "state" / "x").exists()


@pytest.mark.parametrize("name", ["", "refs", "refs/", "/etc/passwd", "refs/../x", "Refs/x",
                                  "refs/a/b", "refs/.hidden", "refs/a b", "packs/" + "a" * 300])
def test_the_client_refuses_malformed_names_without_asking(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing listens on port 9, and no retries: any request would be a BackendError.
    monkeypatch.setenv("STICKYCI_HTTP_RETRY_SECONDS", "0")
    backend = HttpBackend("http://127.0.0.1:9", "sci_0_x")
    calls: list[Callable[[], object]] = [
        lambda: backend.put(name, b"x"), lambda: backend.get(name),
        lambda: backend.get(name, 1, 2), lambda: backend.get(name, 0, 0),
        lambda: backend.stat(name), lambda: backend.delete(name),
        lambda: backend.read_versioned(name), lambda: backend.put_if(name, b"x", None),
        lambda: backend.missing([name])]
    for call in calls:
        with pytest.raises(UsageError):
            call()


# --- request size limits -----------------------------------------------------------------------

def test_oversized_bodies_are_413_and_store_nothing(tmp_path: Path, env: Env) -> None:
    with start_server(tmp_path / "small", args=["--max-body", "1M"]) as server:
        c = server.client()
        at_limit = os.urandom(MiB)
        assert c.put(blob(pack(at_limit)), content=at_limit).status_code == 204
        over = os.urandom(MiB + 1)
        declared = c.put(blob(pack(over)), content=over)
        assert declared.status_code == 413
        assert error(declared).kind == "TooLarge" and "--max-body" in error(declared).error

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams in
            for i in range(0, 2 * MiB, 64 * 1024):
                yield over[i : i + 64 * 1024] if i < len(over) else bytes(64 * 1024)

        streamed = c.put(blob(pack(over)), content=chunks())
        assert streamed.status_code == 413 and error(streamed).kind == "TooLarge"
        batch = c.post(f"{p.PREFIX}/missing", json={"names": ["packs/x" * 200_000]})
        assert batch.status_code == 413
        assert c.head(blob(pack(over))).status_code == 404
        assert names(store_dir(server), "packs") == {pack(at_limit)[6:]}
        assert names(store_dir(server), "tmp") == set()
        with pytest.raises(TooLarge, match="max-body"):
            HttpBackend(server.url, server.admin).put(pack(over), over)

        # a commit whose pack is over the limit: exit 2, one line, the ref where it was
        runner = remote(env, server.url, server.admin, "cache")
        commit_tree(runner, "k", {"small": b"fits"}, "ws")
        ws = env.root / "ws"
        runner.run("disk", "mount", "k", str(ws), "--strategy", "copy")
        (ws / "big.bin").write_bytes(os.urandom(2 * MiB))  # incompressible: a 2 MiB pack
        proc = runner.run("disk", "commit", str(ws), check=False)
        assert proc.returncode == 2 and "--max-body" in one_line_error(proc)
        assert [g["gen"] for g in runner.json("disk", "show", "k")["generations"]] == [1]
        assert (ws / "big.bin").exists()  # the mount is still there to retry


# --- racing ref updates ------------------------------------------------------------------------

def test_racing_writers_of_a_ref_one_wins_the_others_get_409(srv: Server) -> None:
    key = unique("race")
    name = f"refs/{key}"
    HttpBackend(srv.url, srv.admin).put(name, disk_ref(key, 1))
    writers = 8
    barrier = threading.Barrier(writers)

    def attempt(i: int) -> tuple[bool, str]:
        backend = HttpBackend(srv.url, srv.admin)  # each writer its own connection, as runners
        current = backend.read_versioned(name)
        assert current is not None
        barrier.wait()  # all hold the same etag before any of them writes
        return backend.put_if(name, disk_ref(key, 2 + i), current[1]), current[1]

    for _ in range(3):
        with ThreadPoolExecutor(writers) as pool:
            results = list(pool.map(attempt, range(writers)))
        assert sum(won for won, _ in results) == 1
        assert len({etag for _, etag in results}) == 1

    # what a loser hears: the etag that won and the generation it points to
    c = srv.client()
    current = c.get(f"{p.PREFIX}/versioned/{name}")
    lost = c.put(blob(name), content=disk_ref(key, 99), headers={"if-match": "0" * 64})
    assert lost.status_code == 409
    body = error(lost)
    assert body.etag == current.headers["etag"]
    assert body.generation == DiskRef.decode(current.content).latest.gen  # type: ignore[union-attr]


# --- a server killed or restarted under its clients ---------------------------------------------

def _rchar(pid: int) -> int:
    """Bytes the process has read so far (sockets included)."""
    with open(f"/proc/{pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


def test_server_killed_mid_upload_leaves_no_half_object(tmp_path: Path) -> None:
    root = tmp_path / "killed"
    data = os.urandom(8 * MiB)
    name = pack(data)
    with start_server(root) as server:
        port, store = server.port, store_dir(server)
        read0 = _rchar(server.process.pid)
        sock = socket.create_connection(("127.0.0.1", port))
        head = (f"PUT {blob(name)} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {server.admin}\r\nContent-Length: {len(data)}\r\n\r\n")
        sock.sendall(head.encode() + data[: len(data) // 2])
        wait_for(lambda: _rchar(server.process.pid) - read0 >= len(data) // 2,
                 "the server to read half the body")
        server.process.kill()  # SIGKILL: no handler runs, nothing is cleaned up
        server.process.wait()
        with contextlib.suppress(OSError):
            sock.sendall(data[len(data) // 2 :])
        with contextlib.suppress(OSError):
            assert sock.recv(100) == b""  # no answer: the upload was never acknowledged
        sock.close()
    with start_server(root, port=port) as again:
        c = again.client()
        assert c.head(blob(name)).status_code == 404
        assert names(store, "packs") == set() and names(store, "tmp") == set()
        assert c.put(blob(name), content=data).status_code == 204  # the retry goes through
        assert c.get(blob(name)).content == data


def test_a_client_gone_mid_upload_stores_nothing(srv: Server) -> None:
    data = os.urandom(2 * MiB)
    name = pack(data)
    read0 = _rchar(srv.process.pid)
    with socket.create_connection(("127.0.0.1", srv.port)) as sock:
        head = (f"PUT {blob(name)} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {srv.admin}\r\nContent-Length: {len(data)}\r\n\r\n")
        sock.sendall(head.encode() + data[: MiB])
        wait_for(lambda: _rchar(srv.process.pid) - read0 >= MiB, "the server to read 1 MiB")

    def abandoned() -> bool:
        return any(line.startswith("{") and json.loads(line)["path"] == blob(name)
                   and json.loads(line)["status"] == 400
                   for line in srv.log.read_text().splitlines())

    wait_for(abandoned, "the server to log the abandoned upload")
    assert srv.client().head(blob(name)).status_code == 404
    assert not (store_dir(srv) / name).exists()
    assert httpx2.get(f"{srv.url}/healthz").status_code == 200


def test_the_client_retries_across_a_restart(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STICKYCI_HTTP_RETRY_SECONDS", "20")  # a restart takes about a second
    root = tmp_path / "restarted"
    data = os.urandom(3 * MiB)
    with start_server(root) as first:
        port = first.port
        backend = RetryBackend(HttpBackend(first.url, first.admin))
        backend.put(pack(b"warm"), b"warm")  # a pooled connection, which the kill leaves dead
        first.process.kill()
        first.process.wait()
    outcome: list[BaseException | None] = []
    started = threading.Event()

    def upload() -> None:
        started.set()
        try:
            backend.put(pack(data), data)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=upload)
    thread.start()
    started.wait()
    with start_server(root, port=port) as second:
        thread.join(30)
        assert not thread.is_alive() and outcome == [None]
        assert second.client().get(blob(pack(data))).content == data
        assert backend.get(pack(b"warm")) == b"warm"


class DroppingProxy:
    """A TCP proxy in front of a server that, once ``armed``, forwards the next request that
    starts with ``prefix`` but drops its answer and closes the client's connection: the server
    acted, and the client cannot know it (a network failure, or a server killed right after
    the write)."""

    def __init__(self, target: int, prefix: bytes) -> None:
        self.target, self.prefix = target, prefix
        self.armed, self.dropped = threading.Event(), threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._sockets += [client, upstream]
            drop = threading.Event()
            threading.Thread(target=self._up, args=(client, upstream, drop), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client, drop),
                             daemon=True).start()

    def _up(self, client: socket.socket, upstream: socket.socket, drop: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(1 << 16):
                if self.armed.is_set() and data.startswith(self.prefix):
                    self.armed.clear()
                    drop.set()
                upstream.sendall(data)
        with contextlib.suppress(OSError):
            upstream.shutdown(socket.SHUT_WR)

    def _down(self, upstream: socket.socket, client: socket.socket,
              drop: threading.Event) -> None:
        answer = b""
        with contextlib.suppress(OSError):
            while data := upstream.recv(1 << 16):
                if not drop.is_set():
                    client.sendall(data)
                    continue
                answer += data
                if b"\r\n\r\n" in answer:  # the server has answered, so it has acted
                    self.dropped.set()
                    break
        for s in (client, upstream):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def lossy(srv: Server) -> Iterator[DroppingProxy]:
    proxy = DroppingProxy(srv.port, b"PUT /v1/blobs/refs/")
    try:
        yield proxy
    finally:
        proxy.close()


def test_a_lost_answer_to_a_ref_update_is_not_a_lost_race(srv: Server, env: Env,
                                                          lossy: DroppingProxy) -> None:
    url = f"http://127.0.0.1:{lossy.port}"
    key = unique("lost")
    backend = RetryBackend(HttpBackend(url, srv.admin))
    v1, v2 = disk_ref(key, 1), disk_ref(key, 2)
    lossy.armed.set()
    assert backend.put_if(f"refs/{key}", v1, None)  # it landed; say so
    assert lossy.dropped.is_set()
    current = backend.read_versioned(f"refs/{key}")
    assert current is not None and current[0] == v1
    lossy.dropped.clear()
    lossy.armed.set()
    assert backend.put_if(f"refs/{key}", v2, current[1])
    assert lossy.dropped.is_set()
    assert backend.get(f"refs/{key}") == v2
    assert not backend.put_if(f"refs/{key}", disk_ref(key, 3), current[1])  # stale: a real loss

    # through the CLI: a commit whose ref update lost its answer is one generation, no race
    runner = remote(env, url, srv.admin, "cache")
    ws = env.root / "ws"
    disk = unique("lostdisk")
    runner.run("disk", "mount", disk, str(ws), "--strategy", "copy")
    (ws / "f").write_text("once")
    lossy.dropped.clear()
    lossy.armed.set()
    committed = runner.json("disk", "commit", str(ws))
    assert lossy.dropped.is_set()
    assert (committed["generation"], committed["raced_with"]) == (1, [])
    assert [g["gen"] for g in runner.json("disk", "show", disk)["generations"]] == [1]


# --- a full store ------------------------------------------------------------------------------

@pytest.fixture
def tmpfs_store(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs for the server's store (mark the test ``root``)."""
    with tmpfs(tmp_path / "tmpfs", "8m") as store:
        yield store


def _fill(path: Path) -> None:
    """Write until the filesystem under ``path`` has no room left."""
    with open(path, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * (64 * 1024))
            f.flush()


@pytest.mark.root
def test_a_full_store_is_507_and_nothing_is_corrupted(tmp_path: Path, env: Env,
                                                      tmpfs_store: Path) -> None:
    with start_server(tmp_path / "srv", store_url=f"file://{tmpfs_store}") as server:
        runner = remote(env, server.url, server.admin, "cache")
        keep = os.urandom(MiB)
        first = commit_tree(runner, "k", {"keep.bin": keep}, "ws")
        packs0, index0 = names(tmpfs_store, "packs"), names(tmpfs_store, "index")

        # a commit bigger than the store: exit 7, one line, nothing published
        ws = env.root / "ws"
        runner.run("disk", "mount", "k", str(ws), "--strategy", "copy")
        for i in range(3):
            (ws / f"big{i}.bin").write_bytes(os.urandom(4 * MiB))
        proc = runner.run("disk", "commit", str(ws), check=False)
        assert proc.returncode == 7 and "full" in one_line_error(proc)
        shown = runner.json("disk", "show", "k")
        assert [(g["gen"], g["snapshot"]) for g in shown["generations"]] == \
            [(1, first["snapshot"])]
        assert (names(tmpfs_store, "packs"), names(tmpfs_store, "index")) == (packs0, index0)
        assert names(tmpfs_store, "tmp") == set()

        # the HTTP answer itself, and a ref update on a store with no room at all
        c = server.client()
        big = os.urandom(9 * MiB)
        r = c.put(blob(pack(big)), content=big)
        assert r.status_code == 507 and error(r).kind == "StorageFull"
        before = c.get(f"{p.PREFIX}/versioned/refs/k")
        filler = tmpfs_store / "filler"
        _fill(filler)
        moved = DiskRef.decode(before.content)
        moved.last_used += 1
        r = c.put(blob("refs/k"), content=moved.encode(),
                  headers={"if-match": before.headers["etag"]})
        assert r.status_code == 507 and error(r).kind == "StorageFull"
        after = c.get(f"{p.PREFIX}/versioned/refs/k")
        assert (after.content, after.headers["etag"]) == (before.content,
                                                          before.headers["etag"])
        with pytest.raises(StorageFull):
            HttpBackend(server.url, server.admin).put_if("refs/k", moved.encode(),
                                                         before.headers["etag"])
        filler.unlink()

        # generation 1 is whole, seen from a fresh runner; and once it fits, the retry lands
        there = remote(env, server.url, server.admin, "cache2")
        other = env.root / "other"
        there.run("disk", "mount", "k", str(other), "--strategy", "copy")
        assert read_tree(other) == {"keep.bin": keep}
        for i in range(3):
            (ws / f"big{i}.bin").unlink()
        (ws / "small.bin").write_bytes(b"fits")
        assert runner.json("disk", "commit", str(ws))["generation"] == 2


# --- 16 committers on one disk -----------------------------------------------------------------

COMMITTERS = 16


def test_16_concurrent_committers_leave_a_consistent_history(tmp_path: Path, env: Env) -> None:
    with start_server(tmp_path / "srv") as server:
        admin = remote(env, server.url, server.admin, "admin")
        commit_tree(admin, "shared", {"base": b"generation 1"}, "ws-admin")
        runners = [remote(env, server.url, server.admin, f"cache{i}")
                   for i in range(COMMITTERS)]

        def run_all(argv: Callable[[int], list[str]]) -> list[dict[str, Any]]:
            """One CLI process per runner, all at once."""
            procs = [subprocess.Popen([sys.executable, "-m", "stickyci", *argv(i), "--json"],
                                      env=r.environ, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
                     for i, r in enumerate(runners)]
            outs = [proc.communicate(timeout=120) for proc in procs]
            for proc, (_, err) in zip(procs, outs, strict=True):
                assert proc.returncode == 0, err
            return [json.loads(out) for out, _ in outs]

        # every runner mounts generation 1 before any commits, so every commit but the first
        # finds itself overtaken: the race is certain, not a matter of scheduling
        mounts = run_all(lambda i: ["disk", "mount", "shared", str(env.root / f"ws{i}"),
                                    "--strategy", "copy"])
        assert {m["generation"] for m in mounts} == {1}
        for i in range(COMMITTERS):
            (env.root / f"ws{i}" / f"from-{i}").write_text(f"runner {i}\n")
        commits = run_all(lambda i: ["disk", "commit", str(env.root / f"ws{i}")])

        gens = sorted(int(c["generation"]) for c in commits)
        assert gens == list(range(2, COMMITTERS + 2))  # consecutive, none lost or repeated
        for c in commits:
            gen = int(c["generation"])
            raced = [g["gen"] for g in c["raced_with"]]
            # the ref keeps 3 generations: those after this runner's base (1) that it replaced
            assert raced == list(range(max(2, gen - 3), gen)), (gen, raced)
        assert sum(bool(c["raced_with"]) for c in commits) == COMMITTERS - 1

        shown = admin.json("disk", "show", "shared")
        assert [g["gen"] for g in shown["generations"]] == [COMMITTERS - 1, COMMITTERS,
                                                             COMMITTERS + 1]
        (last,) = [i for i, c in enumerate(commits) if c["generation"] == COMMITTERS + 1]
        assert shown["generations"][-1]["snapshot"] == commits[last]["snapshot"]
        fresh = remote(env, server.url, server.admin, "fresh")
        ws = env.root / "latest"
        fresh.run("disk", "mount", "shared", str(ws), "--strategy", "copy")
        assert read_tree(ws) == {"base": b"generation 1",
                                 f"from-{last}": f"runner {last}\n".encode()}
        log = [json.loads(line) for line in server.log.read_text().splitlines()
               if line.startswith("{")]
        assert any(r["status"] == 409 and r["path"] == blob("refs/shared") for r in log)
        assert not [r for r in log if r["status"] >= 500]


def test_a_store_url_that_is_not_a_stickyci_server_is_an_error(tmp_path: Path,
                                                               env: Env) -> None:
    # A real HTTP server of another kind, as a wrong port in STICKYCI_STORE would reach.
    port = free_port()
    (tmp_path / "www").mkdir()
    other = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind",
                              "127.0.0.1", "--directory", str(tmp_path / "www")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _answers(url), "the other server to listen")
        runner = remote(env, url, "sci_0_x", "cache", retry=1)
        ws = env.root / "ws"
        for args in (["disk", "ls"], ["disk", "show", "k"],
                     ["disk", "mount", "k", str(ws), "--strategy", "copy"]):
            proc = runner.run(*args, check=False)
            assert proc.returncode == 11, (args, proc.stderr)  # a misconfigured store
            assert "is not a stickyci server" in one_line_error(proc)
        # no empty disk mounted as if the store were empty
        assert not ws.exists() or list(ws.iterdir()) == []
    finally:
        other.terminate()
        other.wait()


def _answers(url: str) -> bool:
    try:
        httpx2.get(url, timeout=1)
    except httpx2.TransportError:
        return False
    return True
