"""The disk client of a job: disk operations in a process of their own, their document or error.

Every operation runs in a process of its own, for three reasons: the job's event loop stays
free while a commit forks its workers; the operation runs in a session of its own, so the
guard can end all of it (with those workers) and a commit never outlives the process that ran
the job; and a crash or a kill takes down that process, not the runner.

Starting ``python -m stickyci disk`` for each one cost about 0.1 s of interpreter start-up and
imports, several times per job. So a *disk helper* is started once per process: a
single-threaded Python that has imported the disks layer and does nothing else. For each
operation the client hands it one end of a fresh socket pair; the helper forks a child that
runs the operation on that socket, in a new session, with the environment the client sent, and
answers with the same document (``as_dict()``) or JSON error body (``{"error", "kind",
"exit_code"}``) as ``stickyci disk … --json``, so the error class survives the process
boundary and is read back as a :class:`DiskFailure`. A child that died before answering
(killed, a crash) is described by the end of what it wrote on stderr. The helper exits when
the process that started it does (its stdin closes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .stop import Guard

if TYPE_CHECKING:  # the masker's module loads the planner: too heavy for an early prestart
    from .masking import Masker

# The most a child's stderr adds to its answer: the end is what explains a failure.
_ANSWER_MAX = 1 << 24


@dataclass(frozen=True, slots=True)
class DiskFailure:
    """A disk operation that failed."""

    message: str  # one line, masked
    kind: str  # the error class (``ConflictError``…), or "" when it wrote no error body
    exit_code: int


class DiskClient:
    """Runs disk operations for one job, through this process's disk helper."""

    def __init__(self, env: Mapping[str, str] | None, guard: Guard | None, mask: Masker) -> None:
        """``env`` is the operations' environment (None: this process's); ``guard`` is told
        about each operation's process group; ``mask`` is applied to every error message."""
        self.env, self.guard, self.mask = env, guard, mask

    async def mount(self, key: str, path: Path, strategy: str,
                    trust_owners: bool) -> dict[str, Any] | DiskFailure:
        """``stickyci disk mount``: its JSON document, or why it failed."""
        return await self.run("mount", key=key, path=str(path), strategy=strategy,
                              trust_owners=trust_owners)

    async def commit(self, path: Path, mode: str) -> dict[str, Any] | DiskFailure:
        """``stickyci disk commit``: its JSON document, or why it failed."""
        return await self.run("commit", path=str(path), mode=mode)

    async def discard(self, path: Path) -> dict[str, Any] | DiskFailure:
        """``stickyci disk unmount --kill-holders``: drop what the mount holds, stragglers
        included."""
        return await self.run("unmount", path=str(path))

    async def run(self, op: str, **args: Any) -> dict[str, Any] | DiskFailure:
        """Run the disk operation ``op`` with ``args`` in a child of the helper."""
        env = dict(os.environ if self.env is None else self.env)
        reader, writer = await asyncio.open_unix_connection(sock=_connect(), limit=_ANSWER_MAX)
        pid = 0
        try:
            writer.write(json.dumps({"op": op, "args": args, "env": env}).encode() + b"\n")
            await writer.drain()
            hello = await reader.readline()
            pid = int(json.loads(hello)["pid"]) if hello else 0
            answer = b""
            if pid:
                if self.guard:
                    self.guard.add(pid)
                with contextlib.suppress(ConnectionError):
                    # Only once the guard knows it does the operation start.
                    writer.write(b"go\n")
                    await writer.drain()
                    answer = await reader.readline()
        finally:
            writer.close()
            if pid:
                # Whatever is left of its session (a commit's workers) ends with it.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
                if self.guard:
                    self.guard.discard(pid)
        if not answer:
            return DiskFailure(self.mask(f"the disk {op} process died before it answered"),
                               "", 1)
        doc = json.loads(answer)
        if doc["code"] == 0:
            out: dict[str, Any] = doc["out"]
            return out
        return self._failure(doc["code"], doc["out"], doc["err"])

    def _failure(self, code: int, body: Any, err: str) -> DiskFailure:
        """The error body an operation answered with, else the last line of its stderr."""
        if isinstance(body, dict) and "error" in body:
            return DiskFailure(self.mask(" ".join(str(body["error"]).split())),
                               str(body.get("kind", "")), code)
        lines = err.strip().splitlines()
        last = lines[-1] if lines else "it printed nothing"
        return DiskFailure(self.mask(last.removeprefix("stickyci: error: ")[:300]), "", code)


class _Helper:
    """A disk helper: the process, and the control socket requests are sent on."""

    def __init__(self) -> None:
        self.owner = os.getpid()
        control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "import sys; from stickyci.disks.helper import serve; "
                 "serve(int(sys.argv[1]))", str(theirs.fileno())],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, pass_fds=(theirs.fileno(),),
                start_new_session=True)
        self.control = control

    def usable(self) -> bool:
        """Started by this process (not inherited through a fork), and running."""
        return self.owner == os.getpid() and self.proc.poll() is None

    def close(self) -> None:
        """Stop the helper: it exits when its stdin closes."""
        self.control.close()
        if self.proc.stdin:
            self.proc.stdin.close()
        with contextlib.suppress(ChildProcessError):
            self.proc.wait()


_helper: _Helper | None = None
_lock = threading.Lock()  # jobs of one process may run on several threads (Dask)


def prestart() -> None:
    """Start this process's helper now, if it has none, so that the first disk operation does
    not wait for an interpreter to start."""
    with _lock:
        _running()


def _running() -> _Helper:
    """This process's helper, started (or restarted) if need be; the caller holds ``_lock``."""
    global _helper
    if _helper is None or not _helper.usable():
        _helper = _Helper()
    return _helper


def _connect() -> socket.socket:
    """A new connection to this process's helper: the client's end of it."""
    global _helper
    mine, theirs = socket.socketpair()
    try:
        with _lock:
            for attempt in (1, 2):
                try:
                    socket.send_fds(_running().control, [b"+"], [theirs.fileno()])
                    break
                except OSError:
                    if attempt == 2:
                        raise
                    _helper = None  # it died since: start another
    finally:
        theirs.close()
    return mine
