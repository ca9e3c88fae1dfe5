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
import select
import signal
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .masking import Masker
from .stop import Guard

# The most a child's stderr adds to its answer: the end is what explains a failure.
_STDERR_TAIL = 4096
_REQUEST_MAX = 1 << 20  # a request carries the environment
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
        return self._failure(doc["code"], json.dumps(doc["out"]).encode(),
                             doc["err"].encode())

    def _failure(self, code: int, out: bytes, err: bytes) -> DiskFailure:
        try:
            body = json.loads(out)
            return DiskFailure(self.mask(" ".join(str(body["error"]).split())),
                               str(body.get("kind", "")), code)
        except (ValueError, TypeError, KeyError):
            pass
        lines = err.decode(errors="replace").strip().splitlines()
        last = lines[-1] if lines else "it printed nothing"
        return DiskFailure(self.mask(last.removeprefix("stickyci: error: ")[:300]), "", code)


class _Helper:
    """A disk helper: the process, and the control socket requests are sent on."""

    def __init__(self) -> None:
        self.owner = os.getpid()
        control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "import sys; from stickyci.pipeline.diskclient import "
                 "serve; serve(int(sys.argv[1]))", str(theirs.fileno())],
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


def serve(control_fd: int) -> None:
    """The helper's loop: a child per request, until the process that started it is gone."""
    from .. import disks  # noqa: F401  (imported here once, so that no child pays for it)

    control = socket.socket(fileno=control_fd)
    stdin = sys.stdin.fileno()
    while True:
        ready, _, _ = select.select([control, stdin], [], [])
        if stdin in ready and not os.read(stdin, 4096):
            return
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        if control not in ready:
            continue
        msg, fds, _, _ = socket.recv_fds(control, 1, 1)
        if not msg:
            return
        if fds and os.fork() == 0:
            code = 1
            try:
                control.close()
                code = _child(fds[0])
            finally:
                os._exit(code)  # a child never returns into this loop
        for fd in fds:
            os.close(fd)


def _child(fd: int) -> int:
    """Run one operation on the connection ``fd``: read the request, say hello (the pid), wait
    for the go, then answer; stderr is kept to explain a crash."""
    from ..errors import StickyError

    code, out = 1, None
    conn = socket.socket(fileno=fd)
    err = os.memfd_create("stderr")
    try:
        os.setsid()
        os.dup2(err, 2)
        with conn.makefile("rb") as lines:
            line = lines.readline(_REQUEST_MAX)
            if not line.endswith(b"\n"):
                return 1  # the client went away (or sent more than a request can be)
            request = json.loads(line)
            os.environ.clear()
            os.environ.update(request["env"])
            conn.sendall(json.dumps({"pid": os.getpid()}).encode() + b"\n")
            if not lines.readline(16):
                return 1  # the client went away before its guard knew this process
        try:
            out = _execute(request["op"], request["args"])
            code = 0
        except StickyError as exc:
            out = {"error": str(exc), "kind": type(exc).__name__, "exit_code": exc.exit_code}
            code = exc.exit_code
        except OSError as exc:
            name = f" {exc.filename}" if exc.filename else ""
            print(f"stickyci: error:{name}: {exc.strerror or exc}", file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        sys.stderr.flush()
        tail = os.pread(err, _STDERR_TAIL, max(os.fstat(err).st_size - _STDERR_TAIL, 0))
        conn.sendall(json.dumps({"code": code, "out": out,
                                 "err": tail.decode(errors="replace")}).encode() + b"\n")
    finally:
        conn.close()
    return code


def _execute(op: str, args: dict[str, Any]) -> dict[str, Any]:
    from .. import disks

    if op == "mount":
        return disks.mount(args["key"], Path(args["path"]), strategy=args["strategy"],
                           trust_owners=args["trust_owners"]).as_dict()
    if op == "commit":
        return disks.commit(Path(args["path"]), mode=args["mode"]).as_dict()
    if op == "unmount":
        return disks.unmount(Path(args["path"]), kill_holders=True).as_dict()
    raise ValueError(f"unknown disk operation {op!r}")
