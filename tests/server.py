"""A real ``stickyci serve`` for tests: a subprocess on 127.0.0.1 with a free port.

``start_server`` starts one over a store URL (a ``file://`` directory by default) with a state
directory holding an admin token, waits until ``/healthz`` answers, and stops it on exit.
Tests that restart or kill the server pass the first run's ``port`` back in.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
from helpers import Env, TimedOut, wait_for

from stickyci.digest import Digest
from stickyci.store import protocol as p

START_TIMEOUT = 30.0


@dataclass(frozen=True)
class Server:
    """A running server: its URL, an admin token, where it keeps state, and its process."""

    url: str
    port: int
    admin: str
    state: Path
    store_url: str
    process: subprocess.Popen[bytes]
    log: Path

    made: dict[tuple[str, ...], str] = field(default_factory=dict)

    def token(self, *args: str) -> str:
        """Create a token with ``stickyci token create ARGS`` and return it."""
        return create_token(self.state, *args)

    def scoped(self, *args: str) -> str:
        """A token per distinct scope, created once: each creation is a ``stickyci`` process."""
        if args not in self.made:
            self.made[args] = self.token(*args)
        return self.made[args]

    def client(self, token: str | None = None) -> httpx2.Client:
        """An HTTP client for the server, sending ``token`` (the admin's when omitted)."""
        tok = self.admin if token is None else token
        headers = {"authorization": f"Bearer {tok}"} if tok else {}
        return httpx2.Client(base_url=self.url, headers=headers, timeout=30)


def free_port() -> int:
    """A port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def create_token(state: Path, *args: str) -> str:
    """``stickyci token create --state-dir STATE ARGS``, returning the token."""
    out = subprocess.run([sys.executable, "-m", "stickyci", "token", "create",
                          "--state-dir", str(state), *args],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


@contextlib.contextmanager
def start_server(root: Path, *, store_url: str | None = None, port: int | None = None,
                 args: Sequence[str] = (), env: dict[str, str] | None = None
                 ) -> Iterator[Server]:
    """Serve ``store_url`` (default ``file://ROOT/store``) with state under ``ROOT/state``."""
    state = root / "state"
    store_url = store_url or f"file://{root / 'store'}"
    admin_file = state / "admin.token"
    if admin_file.exists():  # a restart keeps the first run's tokens
        admin = admin_file.read_text()
    else:
        state.mkdir(parents=True, exist_ok=True)
        admin = create_token(state, "--admin", "--name", "test-admin")
        admin_file.write_text(admin)
    port = port or free_port()
    log = root / "server.log"
    environ = {**os.environ, **(env or {})}
    environ.pop("STICKYCI_TOKEN", None)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stickyci", "serve", "--store", store_url,
             "--listen", f"127.0.0.1:{port}", "--state-dir", str(state), *args],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=environ)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, url, log)
        yield Server(url, port, admin, state, store_url, proc, log)
    finally:
        stop(proc)


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    def healthy() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"stickyci serve exited {proc.returncode}:\n{log.read_text()}")
        try:
            return httpx2.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx2.TransportError:
            return False

    try:
        wait_for(healthy, "stickyci serve to answer /healthz", START_TIMEOUT, interval=0.05)
    except TimedOut:
        stop(proc)
        raise RuntimeError(f"stickyci serve did not answer within {START_TIMEOUT}s:\n"
                           f"{log.read_text()}") from None


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate the server and reap it (kill if it lingers)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def store_dir(server: Server) -> Path:
    """The directory of a server's ``file://`` store."""
    return Path(server.store_url.removeprefix("file://"))


def blob(name: str) -> str:
    """The store API path of a blob."""
    return f"{p.PREFIX}/blobs/{name}"


def pack(data: bytes) -> str:
    """The name a pack of ``data`` must have."""
    return f"packs/{Digest.of(data).hex}"


def unique(prefix: str) -> str:
    """A disk key no other test of a shared server uses."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def error(r: httpx2.Response) -> p.ErrorBody:
    """The JSON error body every failure carries."""
    assert r.headers["content-type"] == "application/json", r.text
    body = p.ErrorBody.model_validate_json(r.content)
    assert "\n" not in body.error
    return body


def remote(env: Env, server: Server, token: str | None = None, cache: str = "cache") -> Env:
    """``env`` as a runner of ``server`` sees it: its store is the server, its cache ``cache``."""
    cache_dir = env.root / cache
    environ = {**env.environ, "STICKYCI_STORE": server.url,
               "STICKYCI_TOKEN": server.admin if token is None else token,
               "STICKYCI_CACHE_DIR": str(cache_dir), "STICKYCI_HTTP_RETRY_SECONDS": "10"}
    return Env(env.root, store_dir(server), cache_dir, environ)
