"""Processes holding a path: open files, cwd, root, executable or mapped files, from /proc."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import BusyError


@dataclass(frozen=True, slots=True)
class Holder:
    """A process and the path under the mount it holds."""

    pid: int
    command: str
    path: str

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.command}) holds {self.path}"


def _under(target: str, root: str) -> bool:
    return target == root or target.startswith(root + "/")


def _command(pid: str) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    # Arguments may hold newlines (python -c SCRIPT); the error naming holders is one line.
    return " ".join(raw.replace(b"\0", b" ").decode(errors="replace").split())[:120] or "?"


def find(path: Path) -> list[Holder]:
    """Every other process holding something at or under ``path``, one entry per process."""
    root = os.path.realpath(path)
    me = os.getpid()
    found: list[Holder] = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        hit = _held(pid, root)
        if hit:
            found.append(Holder(int(pid), _command(pid), hit))
    return sorted(found, key=lambda h: h.pid)


def _held(pid: str, root: str) -> str | None:
    base = f"/proc/{pid}"
    links = [f"{base}/cwd", f"{base}/root", f"{base}/exe"]
    with contextlib.suppress(OSError):
        links += [f"{base}/fd/{fd}" for fd in os.listdir(f"{base}/fd")]
    for link in links:
        with contextlib.suppress(OSError):
            target = os.readlink(link)
            if _under(target, root):
                return target
    with contextlib.suppress(OSError), open(f"{base}/maps") as maps:
        for line in maps:
            parts = line.split(None, 5)
            if len(parts) == 6 and _under(parts[5].strip(), root):
                return parts[5].strip()
    return None


def release(path: Path, *, kill: bool, grace: float = 5.0) -> list[Holder]:
    """Raise ``BusyError`` naming the holders, or with ``kill`` end them and return them.

    Killing sends SIGTERM, waits up to ``grace`` seconds for the processes to exit, then
    sends SIGKILL to those still alive.
    """
    holders = find(path)
    if not holders:
        return []
    if not kill:
        listing = "; ".join(str(h) for h in holders)
        raise BusyError(f"{path} is busy: {listing}; stop them or pass --kill-holders")
    _signal(holders, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(h.pid) for h in holders):
        time.sleep(0.05)
    _signal([h for h in holders if _alive(h.pid)], signal.SIGKILL)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and find(path):
        time.sleep(0.05)
    left = find(path)
    if left:
        raise BusyError(f"{path} is still busy after SIGKILL: "
                        + "; ".join(str(h) for h in left))
    return holders


def _signal(holders: list[Holder], sig: int) -> None:
    for h in holders:
        with contextlib.suppress(ProcessLookupError):
            os.kill(h.pid, sig)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
