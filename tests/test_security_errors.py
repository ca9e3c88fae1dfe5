"""Attacks on what errors tell and how clients react: a server's store failing must not leak its
internals to a (possibly hostile) client, a permanent failure must not keep every runner
retrying, and the small holes in token and server options stay shut.

Everything is real: ``stickyci serve`` subprocesses in front of a real SeaweedFS started with
wrong credentials or killed, a read-only bind mount under a ``file://`` store, the CLI run as a
runner would run it, and a token file edited on disk as an old version could have left it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from helpers import Env, one_line_error, wait_for
from seaweed import Seaweed, SeaweedUnavailable, start_seaweed
from server import Server, blob, create_token, free_port, pack, start_server, stop, unique

from stickyci.store import protocol as p
from stickyci.store.http import HttpBackend
from stickyci.store.retry import RetryBackend

START_TIMEOUT = 30.0


def s3_environ(sw: Seaweed, root: Path, **overrides: str) -> dict[str, str]:
    """A process environment whose AWS configuration points at ``sw`` and nothing else."""
    environ = {**os.environ,
               "AWS_ACCESS_KEY_ID": sw.access_key, "AWS_SECRET_ACCESS_KEY": sw.secret_key,
               "AWS_DEFAULT_REGION": sw.region, "STICKYCI_S3_ENDPOINT": sw.endpoint,
               "AWS_CONFIG_FILE": str(root / "no-aws-config"),
               "AWS_SHARED_CREDENTIALS_FILE": str(root / "no-aws-credentials"),
               "AWS_EC2_METADATA_DISABLED": "true", **overrides}
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_RETRY_MODE",
                "STICKYCI_TOKEN"):
        environ.pop(var, None)
    return environ


@contextlib.contextmanager
def serve(root: Path, store_url: str, environ: dict[str, str],
          port: int | None = None) -> Iterator[Server]:
    """``stickyci serve`` over ``store_url``; ready once ``/healthz`` answers at all (a server
    whose store refuses it answers 500 there, which is what some tests want)."""
    state = root / "state"
    admin_file = state / "admin.token"
    if admin_file.exists():
        admin = admin_file.read_text()
    else:
        state.mkdir(parents=True, exist_ok=True)
        admin = create_token(state, "--admin")
        admin_file.write_text(admin)
    port = port or free_port()
    log = root / "server.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stickyci", "serve", "--store", store_url,
             "--listen", f"127.0.0.1:{port}", "--state-dir", str(state)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=environ)
    url = f"http://127.0.0.1:{port}"
    def answers() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"stickyci serve exited {proc.returncode}:\n{log.read_text()}")
        try:
            httpx2.get(f"{url}/healthz", timeout=5)
        except httpx2.TransportError:
            return False
        return True

    try:
        wait_for(answers, "stickyci serve to answer /healthz", START_TIMEOUT, interval=0.05)
        yield Server(url, port, admin, state, store_url, proc, log)
    finally:
        stop(proc)


def runner(env: Env, server: Server, cache: str, retry: float = 30) -> Env:
    """A runner of ``server``: its own cache, the admin token, the default retry window."""
    cache_dir = env.root / cache
    return Env(env.root, env.store, cache_dir, {
        **env.environ, "STICKYCI_STORE": server.url, "STICKYCI_TOKEN": server.admin,
        "STICKYCI_CACHE_DIR": str(cache_dir), "STICKYCI_HTTP_RETRY_SECONDS": str(retry)})


def log_lines_with(server: Server, needle: str) -> list[str]:
    return [line for line in server.log.read_text().splitlines() if needle in line]


def access_log(server: Server) -> list[dict[str, object]]:
    return [json.loads(line) for line in server.log.read_text().splitlines()
            if line.startswith("{")]


# --- a store that refuses the server's credentials ---------------------------------------------


@pytest.fixture
def secrets_of(seaweed: Seaweed) -> dict[str, str]:
    """What a client must never see of the server's store: endpoint, bucket, prefix, key id."""
    return {"endpoint": seaweed.endpoint, "port": seaweed.endpoint.rsplit(":", 1)[1],
            "bucket": seaweed.bucket, "prefix": f"leak-{uuid.uuid4().hex[:10]}",
            "access key": f"AKLEAK{uuid.uuid4().hex[:12].upper()}"}


def refused_environ(sw: Seaweed, root: Path, leak: dict[str, str]) -> dict[str, str]:
    return s3_environ(sw, root, AWS_ACCESS_KEY_ID=leak["access key"],
                      AWS_SECRET_ACCESS_KEY="wrong-" + uuid.uuid4().hex)


def assert_no_leak(text: str, leak: dict[str, str]) -> None:
    for what, value in leak.items():
        assert value not in text, f"the client saw the store's {what} ({value}): {text}"


def test_refused_credentials_fail_runners_at_once_and_tell_them_nothing_internal(
        seaweed: Seaweed, secrets_of: dict[str, str], tmp_path: Path,
        env: Env) -> None:
    leak = secrets_of
    url = f"s3://{seaweed.bucket}/{leak['prefix']}"
    with serve(tmp_path / "srv", url, refused_environ(seaweed, tmp_path, leak)) as server:
        run = runner(env, server, "cache")
        ws = env.root / "ws"
        started = time.monotonic()
        proc = run.run("disk", "mount", "k", str(ws), "--strategy", "copy", check=False)
        elapsed = time.monotonic() - started
        # A retry window of 30 s is set: a refusal must not wait it out.
        assert elapsed < 10, f"the mount took {elapsed:.1f} s: the refusal was retried"
        assert proc.returncode == 11, proc.stderr
        line = one_line_error(proc)
        assert server.url in line and "refused its credentials" in line, line
        assert_no_leak(proc.stdout + proc.stderr, leak)
        rid = line.rsplit("request id ", 1)[1].split()[0].rstrip(".;)")
        # The operator's log has the details, under the id the runner was given.
        detail = log_lines_with(server, f"request {rid}")
        assert detail and leak["endpoint"] in detail[0] and seaweed.bucket in detail[0], detail
        assert any(r["id"] == rid and r["status"] == 500 for r in access_log(server))

        # The same seen raw, as any client of the server would see it.
        with server.client() as c:
            data = os.urandom(1000)
            r = c.put(blob(pack(data)), content=data)
            assert r.status_code == 500
            body = p.ErrorBody.model_validate_json(r.content)
            assert body.kind == "StoreMisconfigured"
            assert body.request_id == r.headers[p.REQUEST_ID_HEADER]
            assert body.request_id in body.error
            assert_no_leak(r.text + str(r.headers), leak)
            health = c.get("/healthz")
            assert health.status_code == 500
            assert_no_leak(health.text, leak)


def test_a_commit_through_a_server_whose_credentials_broke_fails_at_once(
        seaweed: Seaweed, secrets_of: dict[str, str], tmp_path: Path,
        env: Env) -> None:
    leak = secrets_of
    url = f"s3://{seaweed.bucket}/{leak['prefix']}"
    root, port = tmp_path / "srv", free_port()
    ws = env.root / "ws"
    with serve(root, url, s3_environ(seaweed, tmp_path), port) as good:
        run = runner(env, good, "cache")
        run.run("disk", "mount", "k", str(ws), "--strategy", "copy")
        (ws / "work.txt").write_text("the job's output\n")
    # Restarted at the same address with credentials that no longer work (a rotated key).
    with serve(root, url, refused_environ(seaweed, tmp_path, leak), port) as broken:
        started = time.monotonic()
        proc = run.run("disk", "commit", str(ws), check=False)
        elapsed = time.monotonic() - started
        assert elapsed < 10, f"the commit took {elapsed:.1f} s: the refusal was retried"
        assert proc.returncode == 11, proc.stderr
        line = one_line_error(proc)
        assert broken.url in line and "request id" in line, line
        assert_no_leak(proc.stdout + proc.stderr, leak)


# --- a store that is briefly away --------------------------------------------------------------


def test_a_killed_store_is_503_and_the_client_rides_it_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STICKYCI_HTTP_RETRY_SECONDS", "90")  # a SeaweedFS start takes seconds
    try:
        sw_cm = start_seaweed(tmp_path / "sw")
        sw = sw_cm.__enter__()
    except SeaweedUnavailable as exc:
        pytest.skip(f"SeaweedFS unavailable: {exc}")
    restarted: contextlib.ExitStack = contextlib.ExitStack()
    try:
        url = f"s3://{sw.bucket}/away"
        # One attempt per request at the server: the test is about the runner's retries.
        environ = s3_environ(sw, tmp_path, AWS_MAX_ATTEMPTS="1")
        with serve(tmp_path / "srv", url, environ) as server:
            backend = RetryBackend(HttpBackend(server.url, server.admin))
            backend.put("refs/k", b"before")
            sw.process.kill()
            sw.process.wait()
            with server.client() as c:
                r = c.get(f"{p.PREFIX}/versioned/refs/k")
            assert r.status_code == 503, r.text
            body = p.ErrorBody.model_validate_json(r.content)
            assert body.kind == "StoreUnavailable"
            assert sw.endpoint not in r.text and sw.bucket not in r.text

            outcome: list[object] = []

            def read() -> None:
                try:
                    reader = RetryBackend(HttpBackend(server.url, server.admin))
                    outcome.append(reader.get("refs/k"))
                except BaseException as exc:
                    outcome.append(exc)

            thread = threading.Thread(target=read)
            thread.start()
            # The store comes back only once the reader has been turned away with a 503.
            wait_for(lambda: sum(r["status"] == 503 for r in access_log(server)) >= 2,
                     "the reader to be answered 503")
            restarted.enter_context(start_seaweed(tmp_path / "sw", ports=sw.ports))
            thread.join(60)
            assert not thread.is_alive() and outcome == [b"before"], outcome
    finally:
        restarted.close()
        sw_cm.__exit__(None, None, None)


# --- a file:// store the server may not write -------------------------------------------------


@pytest.mark.root  # a read-only bind mount
def test_a_read_only_file_store_is_a_permanent_500_naming_no_path(tmp_path: Path,
                                                                  env: Env) -> None:
    store = tmp_path / "hidden-store-dir"
    (store / "tmp").mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(store), str(store)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(store)], check=True)
        with serve(tmp_path / "srv", f"file://{store}", dict(os.environ)) as server:
            with server.client() as c:
                r = c.put(blob(pack(b"x")), content=b"x")
            assert r.status_code == 500
            body = p.ErrorBody.model_validate_json(r.content)
            assert body.kind == "StoreMisconfigured" and "denied it access" in body.error
            assert str(store) not in r.text and "hidden-store-dir" not in r.text
            assert any(str(store) in line and body.request_id in line
                       for line in log_lines_with(server, "Read-only file system"))
            # A runner is told at once, with the exit code for a misconfigured store.
            run = runner(env, server, "cache")
            ws = env.root / "ws"
            run.run("disk", "mount", "k", str(ws), "--strategy", "copy")
            (ws / "f").write_text("x")
            proc = run.run("disk", "commit", str(ws), check=False)
            assert proc.returncode == 11, proc.stderr
            assert "hidden-store-dir" not in one_line_error(proc)
    finally:
        subprocess.run(["umount", "-l", str(store)], check=False)


# --- request ids --------------------------------------------------------------------------------


def test_every_response_carries_a_request_id_that_the_access_log_files(srv: Server) -> None:
    with srv.client() as c:
        answers = [c.get("/healthz"), c.get(blob("packs/nope")), c.get("/no/such/route"),
                   c.put(blob(pack(b"ok")), content=b"ok"),
                   c.get(blob("refs/k"), headers={"authorization": "Bearer sci_x_y"}),
                   c.get("/healthz", headers={p.REQUEST_ID_HEADER: "forged-id"})]
    ids = [r.headers[p.REQUEST_ID_HEADER] for r in answers]
    assert len(set(ids)) == len(ids) and "forged-id" not in ids
    for r in answers[1:3] + answers[4:5]:
        if r.headers.get("content-type") == "application/json":
            assert p.ErrorBody.model_validate_json(r.content).request_id == \
                r.headers[p.REQUEST_ID_HEADER]
    wait_for(lambda: set(ids) <= {r["id"] for r in access_log(srv)},
             "the access log to file every request id")


# --- token and server options ------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["--read", "x-*", "--expires", "0s"],
    ["--read", "x-*", "--expires", "0.0h"],
    ["--read", "x-*", "--expires", ""],
    ["--read", "x-*", "--expires", "-5m"],
    ["--read", ""],
    ["--read", "   "],
    ["--write", ""],
    ["--delete", " "],
    ["--read", "main-*", "--write", ""],
])
def test_token_create_refuses_a_token_that_would_grant_too_much(tmp_path: Path,
                                                                 args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "stickyci", "token", "create",
                           "--state-dir", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    one_line_error(proc)
    assert proc.stdout == ""
    assert not (tmp_path / "tokens.json").exists()


@pytest.mark.parametrize("args", [["--evict-every", "0s"], ["--evict-every", "0.5s"],
                                  ["--evict-after", "0s"], ["--evict-after", "1d",
                                                            "--evict-every", "0m"]])
def test_serve_refuses_a_schedule_that_would_spin(tmp_path: Path, args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "stickyci", "serve",
                           "--store", f"file://{tmp_path / 'store'}", "--state-dir",
                           str(tmp_path / "state"), "--listen", f"127.0.0.1:{free_port()}",
                           *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    line = one_line_error(proc)
    assert args[-2] in line, line


def test_a_blank_pattern_in_the_token_file_grants_nothing(srv: Server) -> None:
    key = unique("blank")
    with srv.client() as admin:
        data = os.urandom(100)
        assert admin.put(blob(pack(data)), content=data).status_code == 204
    token = srv.token("--read", "zz-never-matches", "--name", "blank")
    token_id = token.split("_")[1]
    # As a version that accepted --read '' (or a hand edit) left it.
    path = srv.state / "tokens.json"
    rows = json.loads(path.read_text())
    for row in rows["tokens"]:
        if row["id"] == token_id:
            row["read"], row["write"], row["delete"] = ["", "  "], [""], ["\t"]
    tmp = path.with_suffix(".test-edit")
    tmp.write_text(json.dumps(rows))
    os.replace(tmp, path)

    with srv.client(token) as c:
        refused = [c.get(f"{p.PREFIX}/list/packs"), c.get(f"{p.PREFIX}/list/refs"),
                   c.get(blob(pack(data))), c.head(blob(pack(data))),
                   c.get(f"{p.PREFIX}/versioned/refs/{key}"),
                   c.post(f"{p.PREFIX}/missing", json={"names": [pack(data)]}),
                   c.put(blob(pack(b"new")), content=b"new"),
                   c.put(blob(f"refs/{key}"), content=b"{}"),
                   c.delete(blob(f"refs/{key}"))]
        assert [r.status_code for r in refused] == [403] * len(refused)
        listed = c.get(f"{p.PREFIX}/disks")
        assert listed.status_code == 200 and listed.json()["disks"] == []


def test_an_unreadable_token_file_is_the_servers_trouble_not_the_clients(tmp_path: Path) -> None:
    with start_server(tmp_path / "srv") as server:
        path = server.state / "tokens.json"
        tmp = path.with_suffix(".test-edit")
        tmp.write_text('{"tokens": [{"id": "torn')
        os.replace(tmp, path)
        with server.client() as c:
            r = c.get(f"{p.PREFIX}/list/refs")
        assert r.status_code == 500, r.text
        body = p.ErrorBody.model_validate_json(r.content)
        assert body.kind == "StoreMisconfigured" and "token file" in body.error
        assert str(server.state) not in r.text
        wait_for(lambda: any(str(path) in line for line in
                             log_lines_with(server, f"request {body.request_id}")),
                 "the server log to name the token file")
    proc = subprocess.run([sys.executable, "-m", "stickyci", "token", "ls", "--state-dir",
                           str(server.state)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 11 and str(path) in one_line_error(proc)
