"""Processes holding a path, from /proc: open files, cwd, root, executable or mapped files,
sockets bound under it, and (on a mount) processes rooted in it from another mount namespace."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from .. import procs
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


def find(path: Path) -> list[Holder]:
    """Every other process holding something at or under ``path``, one entry per process."""
    root = os.path.realpath(path)
    sockets = _bound_sockets()
    dev = os.stat(root).st_dev if os.path.ismount(root) else None
    found: list[Holder] = []
    for pid in procs.pids():
        hit = _held(pid, root, sockets)
        if hit is None and dev is not None:
            hit = _rooted_in(pid, root, dev)
        if hit:
            found.append(Holder(pid, procs.command(pid), hit))
    return sorted(found, key=lambda h: h.pid)


def _rooted_in(pid: int, root: str, dev: int) -> str | None:
    """What a process in another mount namespace (a sandboxed build, whose root is a chroot on
    the mount) holds: its paths are its namespace's, so only the device tells."""
    for name in ("root", "cwd"):
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/{pid}/{name}").st_dev == dev:
                seen = os.readlink(f"/proc/{pid}/{name}")
                return f"{root} (its {name}, {seen} in its own mount namespace)"
    return None


def _bound_sockets() -> dict[str, str]:
    """Unix sockets bound to a path, as ``socket:[inode]`` (an fd's link) → path.

    A daemon listening on a socket under the mount (``nix-daemon``) may hold nothing else
    there, and its fd shows only the inode; /proc/net/unix names the path it was bound to
    (relative if the binder passed a relative path, which is then not matched).
    """
    out: dict[str, str] = {}
    with contextlib.suppress(OSError), open("/proc/net/unix") as table:
        next(table, None)
        for line in table:
            fields = line.rstrip("\n").split(None, 7)
            if len(fields) == 8 and fields[7].startswith("/"):
                out[f"socket:[{fields[6]}]"] = fields[7]
    return out


def _held(pid: int, root: str, sockets: dict[str, str]) -> str | None:
    base = f"/proc/{pid}"
    targets = []
    for link in ("cwd", "root", "exe"):
        with contextlib.suppress(OSError):
            targets.append(os.readlink(f"{base}/{link}"))
    for target in (*targets, *procs.fd_links(pid)):
        target = sockets.get(target, target)
        if _under(target, root):
            return target
    with contextlib.suppress(OSError), open(f"{base}/maps") as maps:
        for line in maps:
            parts = line.split(None, 5)
            if len(parts) == 6 and _under(parts[5].strip(), root):
                return parts[5].strip()
    return None


def device_in_use(dev: int) -> str | None:
    """What still uses the filesystem ``dev`` once it is unmounted here (an overlay lives on
    while any mount of it or any file on it is held), or None: a mount of it in any mount
    namespace, or a process's cwd, root, executable, open file or mapping on it."""
    pair = f"{os.major(dev)}:{os.minor(dev)}"
    spaced, mapped = f" {pair} ", f" {os.major(dev):02x}:{os.minor(dev):02x} "
    namespaces: set[int] = set()
    for pid in ("self", *map(str, procs.pids())):
        base = f"/proc/{pid}"
        with contextlib.suppress(OSError):
            ns = os.stat(f"{base}/ns/mnt").st_ino
            if ns not in namespaces:
                namespaces.add(ns)
                with open(f"{base}/mountinfo") as mounts:
                    if any(spaced in line for line in mounts):
                        return f"a mount namespace of pid {pid} still mounts it"
        if pid == "self":
            continue
        links = [f"{base}/{name}" for name in ("cwd", "root", "exe")]
        with contextlib.suppress(OSError):
            links += [f"{base}/fd/{fd}" for fd in os.listdir(f"{base}/fd")]
        for link in links:
            with contextlib.suppress(OSError):
                if os.stat(link).st_dev == dev:
                    return f"pid {pid} ({procs.command(int(pid))}) holds a file on it"
        with contextlib.suppress(OSError), open(f"{base}/maps") as maps:
            if any(mapped in line for line in maps):
                return f"pid {pid} ({procs.command(int(pid))}) maps a file on it"
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
