"""Other processes, read from /proc: which exist, their command lines, what their fds point at.

Every reader here tolerates a process that exits while it is being read: it is skipped, never
an error, since the caller is looking at processes it does not control.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Set

COMMAND_MAX = 120
"""Characters of a command line shown in a message (one line, however long the arguments)."""


def pids() -> Iterator[int]:
    """Every process's pid but this one's."""
    me = os.getpid()
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != me:
            yield int(name)


def command(pid: int) -> str:
    """The command line of ``pid`` on one line (arguments may hold newlines), shortened to
    ``COMMAND_MAX`` characters; "?" if it is gone or has none (a kernel thread)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return "?"
    text = " ".join(raw.replace(b"\0", b" ").decode(errors="replace").split())
    if not text:
        return "?"
    return text if len(text) <= COMMAND_MAX else text[:COMMAND_MAX] + " …"


def fd_links(pid: int) -> Iterator[str]:
    """What the open fds of ``pid`` point at (a path, ``pipe:[inode]``, ``socket:[inode]``)."""
    fds = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fds)
    except OSError:
        return
    for fd in names:
        with contextlib.suppress(OSError):
            yield os.readlink(f"{fds}/{fd}")


def writes_to(pid: int, links: Set[str]) -> bool:
    """Whether ``pid`` holds one of ``links`` (as :func:`fd_links` names them) open for
    writing. Holding it for reading is not enough: a process forked from one that reads a pipe
    holds the read end until it execs, whatever it is about to become."""
    fds = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fds)
    except OSError:
        return False
    for fd in names:
        with contextlib.suppress(OSError, ValueError):
            if os.readlink(f"{fds}/{fd}") in links and _writable(pid, fd):
                return True
    return False


def _writable(pid: int, fd: str) -> bool:
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("flags:"):
                return int(line.split()[1], 8) & os.O_ACCMODE != os.O_RDONLY
    return False
