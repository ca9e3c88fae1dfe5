"""The disk helper's side (see :mod:`stickyci.pipeline.diskclient` for the client's): a
single-threaded loop that forks a child per disk operation a client hands it.

It is a module of the disks layer, and imports nothing above it, so that the helper's start
(an interpreter and this layer's imports) is as short as it can be: the first operation of a
run waits for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import sys
import traceback
from pathlib import Path
from typing import Any

from ..errors import StickyError
from .api import commit, mount, unmount

# The most a child's stderr adds to its answer: the end is what explains a failure.
_STDERR_TAIL = 4096
_REQUEST_MAX = 1 << 20  # a request carries the environment


def serve(control_fd: int) -> None:
    """The helper's loop: a child per request, until the process that started it is gone."""
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
    if op == "mount":
        return mount(args["key"], Path(args["path"]), strategy=args["strategy"],
                     trust_owners=args["trust_owners"]).as_dict()
    if op == "commit":
        return commit(Path(args["path"]), mode=args["mode"]).as_dict()
    if op == "unmount":
        return unmount(Path(args["path"]), kill_holders=True).as_dict()
    raise ValueError(f"unknown disk operation {op!r}")
