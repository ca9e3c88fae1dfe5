"""Busy mounts with real processes: cwd, open file, mmap, executable; refusing and killing them."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import STRATEGIES, Env, wait_for

HOLD_OPEN = "import sys; f = open(sys.argv[1], 'rb'); sys.stdin.read()"
# libc's mmap, not Python's: mmap.mmap keeps a dup of the fd, and the point is a mapping alone
HOLD_MMAP = ("import ctypes, os, sys; libc = ctypes.CDLL(None, use_errno=True); "
             "libc.mmap.restype = ctypes.c_void_p; "
             "libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, "
             "ctypes.c_int, ctypes.c_long]; fd = os.open(sys.argv[1], os.O_RDONLY); "
             "p = libc.mmap(None, 4096, 1, 1, fd, 0); os.close(fd); "
             "assert p not in (None, ctypes.c_void_p(-1).value); sys.stdin.read()")


def _readlink(link: str) -> str:
    try:
        return os.readlink(link)
    except OSError:
        return ""


def cwd_is(pid: int, path: Path) -> bool:
    return _readlink(f"/proc/{pid}/cwd") == str(path)


def has_fd(pid: int, path: Path) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    return any(_readlink(f"/proc/{pid}/fd/{fd}") == str(path) for fd in fds)


def maps(pid: int, path: Path) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return any(line.rstrip("\n").endswith(" " + str(path)) for line in f)
    except OSError:
        return False


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start processes that are killed and reaped at the end of the test, whatever happens."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(args: list[str], **kw: object) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)
        if p.stdin:
            p.stdin.close()


def _mount_with_base(env: Env, ws: Path, strategy: str) -> None:
    env.run("disk", "mount", "k", str(ws), "--strategy", strategy)
    (ws / "data.bin").write_bytes(os.urandom(64 << 10))
    (ws / "log.txt").write_text("log\n")
    (ws / "sub").mkdir()
    assert env.json("disk", "commit", str(ws))["generation"] == 1
    env.run("disk", "mount", "k", str(ws), "--strategy", strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_commit_names_holders_then_kills_them(
        env: Env, spawn: Callable[..., subprocess.Popen[bytes]], strategy: str) -> None:
    ws = env.root / "ws"
    _mount_with_base(env, ws, strategy)
    ws = ws.resolve()
    (ws / "bin").mkdir()
    sleep_bin = shutil.which("sleep")
    assert sleep_bin
    shutil.copy2(os.path.realpath(sleep_bin), ws / "bin" / "sleep")
    (ws / "new.txt").write_text("new\n")

    in_cwd = spawn(["sleep", "300"], cwd=ws / "sub")
    opened = spawn([sys.executable, "-c", HOLD_OPEN, str(ws / "log.txt")], cwd=env.root)
    mapped = spawn([sys.executable, "-c", HOLD_MMAP, str(ws / "data.bin")], cwd=env.root)
    exe = spawn([str(ws / "bin" / "sleep"), "301"], cwd=env.root)
    wait_for(lambda: cwd_is(in_cwd.pid, ws / "sub"), "sleep to run in the mount")
    wait_for(lambda: has_fd(opened.pid, ws / "log.txt"), "python to open log.txt")
    wait_for(lambda: maps(mapped.pid, ws / "data.bin"), "python to map data.bin")
    assert not has_fd(mapped.pid, ws / "data.bin")  # held through the mapping alone
    wait_for(lambda: _readlink(f"/proc/{exe.pid}/exe") == str(ws / "bin" / "sleep"),
             "sleep to run from the mount")
    holders = (in_cwd, opened, mapped, exe)

    refused = env.run("disk", "commit", str(ws), check=False)
    assert refused.returncode == 6, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    line = lines[0]
    assert "--kill-holders" in line and "Traceback" not in line
    assert f"pid {in_cwd.pid} (sleep 300) holds {ws / 'sub'}" in line
    assert f"pid {opened.pid} ({sys.executable} -c " in line and f"holds {ws / 'log.txt'}" in line
    assert f"pid {mapped.pid} ({sys.executable} -c " in line and str(ws / "data.bin") in line
    assert f"pid {exe.pid} ({ws / 'bin' / 'sleep'} 301) holds" in line
    # nothing moved, nothing was touched, the holders are left alone
    assert all(p.poll() is None for p in holders)
    assert [g["gen"] for g in env.json("disk", "show", "k")["generations"]] == [1]
    assert (ws / "new.txt").read_text() == "new\n"

    done = env.json("disk", "commit", str(ws), "--kill-holders")
    assert done["committed"] and done["generation"] == 2 and done["added"] == 3
    assert sorted(int(k.split()[1]) for k in done["killed"]) == sorted(p.pid for p in holders)
    for p in holders:
        assert p.wait(timeout=10) == -signal.SIGTERM  # SIGTERM was enough
    env.run("disk", "mount", "k", str(ws), "--strategy", strategy)
    assert (ws / "new.txt").read_text() == "new\n"
    assert (ws / "bin" / "sleep").read_bytes() == Path(os.path.realpath(sleep_bin)).read_bytes()
    env.run("disk", "unmount", str(ws))


def test_holder_ignoring_sigterm_is_killed(env: Env,
                                           spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    ws = env.root / "ws"
    _mount_with_base(env, ws, "copy")
    ws = ws.resolve()
    (ws / "more").write_text("x")
    stubborn = spawn(["bash", "-c", f"trap '' TERM; cd '{ws}' && read -r _"], cwd=env.root)
    wait_for(lambda: cwd_is(stubborn.pid, ws), "bash to enter the mount")
    start = time.monotonic()
    done = env.json("disk", "commit", str(ws), "--kill-holders")
    assert done["committed"] and done["generation"] == 2
    assert [int(k.split()[1]) for k in done["killed"]] == [stubborn.pid]
    assert stubborn.wait(timeout=10) == -signal.SIGKILL
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_unmount_refuses_while_held(env: Env, spawn: Callable[..., subprocess.Popen[bytes]],
                                    strategy: str) -> None:
    ws = env.root / "ws"
    _mount_with_base(env, ws, strategy)
    ws = ws.resolve()
    holder = spawn(["sleep", "300"], cwd=ws / "sub")
    wait_for(lambda: cwd_is(holder.pid, ws / "sub"), "sleep to run in the mount")
    refused = env.run("disk", "unmount", str(ws), check=False)
    assert refused.returncode == 6 and f"pid {holder.pid} (sleep 300)" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert (ws / "log.txt").read_text() == "log\n" and holder.poll() is None
    out = env.json("disk", "unmount", str(ws), "--kill-holders")
    assert out["discarded"] and len(out["killed"]) == 1
    assert holder.wait(timeout=10) == -signal.SIGTERM
    assert list(ws.iterdir()) == []
    assert not os.path.ismount(ws)


def test_unrelated_process_is_not_a_holder(env: Env,
                                           spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    ws = env.root / "ws"
    _mount_with_base(env, ws, "copy")
    ws = ws.resolve()
    # a sibling whose path merely starts with the mount's path is not under it
    sibling = env.root / (ws.name + "2")
    sibling.mkdir()
    (sibling / "f").write_text("x")
    near = spawn([sys.executable, "-c", HOLD_OPEN, str(sibling / "f")], cwd=sibling)
    wait_for(lambda: has_fd(near.pid, sibling / "f"), "python to open the sibling file")
    (ws / "n").write_text("n")
    done = env.json("disk", "commit", str(ws))
    assert done["committed"] and done["killed"] == []
    assert near.poll() is None


def test_busy_message_stays_one_line_for_multiline_cmdline(
        env: Env, spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    """A holder started with a multi-line argument (python -c SCRIPT) is still named on one
    line: the error contract is one line on stderr."""
    ws = env.root / "ws"
    _mount_with_base(env, ws, "copy")
    ws = ws.resolve()
    script = "import os, sys\nos.chdir(sys.argv[1])\nsys.stdin.read()\n"
    holder = spawn([sys.executable, "-c", script, str(ws)], cwd=env.root)
    wait_for(lambda: cwd_is(holder.pid, ws), "python to enter the mount")
    refused = env.run("disk", "commit", str(ws), check=False)
    assert refused.returncode == 6 and f"pid {holder.pid}" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    env.run("disk", "unmount", str(ws), "--kill-holders")


HOLD_SOCKET = ("import os, socket, sys; s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); "
               "s.listen(); os.chdir('/'); sys.stdin.read()")


def test_a_daemon_holding_only_a_listening_socket_is_a_holder(
        env: Env, spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    """A daemon's only hold on the disk may be the socket it listens on (nix-daemon): its fd
    shows ``socket:[inode]`` with no path, which /proc/net/unix maps back to the path."""
    ws = env.root / "ws"
    _mount_with_base(env, ws, "copy")
    ws = ws.resolve()
    sock = ws / "sub" / "daemon.sock"
    daemon = spawn([sys.executable, "-c", HOLD_SOCKET, str(sock)], cwd="/")
    wait_for(lambda: sock.exists() and cwd_is(daemon.pid, Path("/")), "the daemon to listen")
    refused = env.run("disk", "commit", str(ws), check=False)
    assert refused.returncode == 6 and f"pid {daemon.pid}" in refused.stderr, refused.stderr
    assert "daemon.sock" in refused.stderr
    done = env.json("disk", "commit", str(ws), "--kill-holders")
    assert done["committed"] and daemon.wait(timeout=10) != 0
