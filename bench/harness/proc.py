"""Processes: run a command, start servers in sessions of their own, wait for them, stop them."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
TESTS = REPO / "tests"


def log(msg: str) -> None:
    """Progress on stderr, so stdout carries only the Markdown report."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: str | Sequence[str], *, env: dict[str, str] | None = None,
        data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run a command (a string runs in bash with pipefail); raise with its stderr on failure."""
    argv = ["bash", "-o", "pipefail", "-c", cmd] if isinstance(cmd, str) else list(cmd)
    proc = subprocess.run(argv, env=env, input=data, capture_output=True, check=False)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()[-2000:]
        raise RuntimeError(f"{cmd!r} exited {proc.returncode}: {err}")
    return proc


def stickyci(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run this interpreter's stickyci CLI; exit with its stderr if it fails."""
    proc = subprocess.run([sys.executable, "-m", "stickyci", *args], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"stickyci {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return proc


def first_line(cmd: Sequence[str]) -> str:
    """The first line a command prints (stdout, else stderr), or ``?``: tool versions."""
    try:
        p = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
        return (p.stdout + p.stderr).strip().splitlines()[0]
    except (OSError, IndexError):
        return "?"


def tests_helpers() -> None:
    """Make tests/ importable: the SeaweedFS and ``stickyci serve`` harnesses live there, and a
    benchmark starts its servers the way the tests do rather than with a copy of that code."""
    if str(TESTS) not in sys.path:
        sys.path.append(str(TESTS))


def free_port() -> int:
    """A port nobody listens on right now (the tests' helper)."""
    tests_helpers()
    from server import free_port as tests_free_port

    port: int = tests_free_port()
    return port


def create_token(state: Path, *args: str) -> str:
    """``stickyci token create --state-dir STATE ARGS`` (the tests' helper): the token."""
    tests_helpers()
    from server import create_token as tests_create_token

    token: str = tests_create_token(state, *args)
    return token


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process started in a session of its own, with everything it started."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    else:  # its children may outlive it (a uvicorn worker, an nginx worker)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def started(cmds: Sequence[Sequence[str]], log_path: Path, *, pass_fds: Sequence[int] = (),
            env: dict[str, str] | None = None) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Start processes (each in a new session, output to ``log_path``); stop them on exit."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with open(log_path, "ab") as out:
            for cmd in cmds:
                procs.append(subprocess.Popen(
                    list(cmd), stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                    start_new_session=True, pass_fds=tuple(pass_fds), env=env))
        yield procs
    finally:
        for proc in procs:
            stop(proc)


def wait_http(url: str, procs: Sequence[subprocess.Popen[bytes]], log_path: Path,
              headers: dict[str, str] | None = None, timeout: float = 30.0) -> None:
    """Poll ``url`` until it answers 200; fail with the log if a process exits first."""
    host, _, rest = url.removeprefix("http://").partition("/")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited {proc.returncode}:\n"
                                   f"{log_path.read_text()[-3000:]}")
        try:
            conn = http.client.HTTPConnection(host, timeout=2)
            conn.request("GET", "/" + rest, headers=headers or {})
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)  # polling a condition with a deadline
    raise RuntimeError(f"{url} did not answer within {timeout}s:\n{log_path.read_text()[-3000:]}")


def process_parents() -> dict[int, int]:
    """Every live process and its parent (/proc)."""
    parent: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry.name}/stat") as f:
                parent[int(entry.name)] = int(f.read().rpartition(")")[2].split()[1])
    return parent


def tree_ticks(roots: Sequence[int]) -> int:
    """CPU clock ticks (user + system) of processes ``roots`` and all their descendants, alive
    now, plus the children they already reaped."""
    parent: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        pid = int(entry.name)
        parent[pid] = int(fields[1])
        ticks[pid] = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return sum(ticks[p] for p in descendants(roots, parent))


def tree_rss_anon(roots: Sequence[int]) -> int:
    """Sum of the private memory (RssAnon: heap and the like, not mapped files) that
    ``roots`` and their live descendants hold now."""
    total = 0
    for pid in descendants(roots, process_parents()):
        with contextlib.suppress(OSError, StopIteration), open(f"/proc/{pid}/status") as f:
            total += int(next(ln for ln in f if ln.startswith("RssAnon:")).split()[1]) * 1024
    return total


def descendants(roots: Sequence[int], parent: dict[int, int]) -> set[int]:
    """``roots`` (those alive) and every process below them, given each process's parent."""
    wanted, frontier = set(), [r for r in roots if r in parent]
    while frontier:
        pid = frontier.pop()
        wanted.add(pid)
        frontier += [c for c, p in parent.items() if p == pid and c not in wanted]
    return wanted


def tree_peak_rss(roots: Sequence[int]) -> int:
    """Sum of the peak resident set sizes (VmHWM) of ``roots`` and their live descendants."""
    total = 0
    for pid in descendants(roots, process_parents()):
        with contextlib.suppress(OSError, StopIteration), open(f"/proc/{pid}/status") as f:
            total += int(next(ln for ln in f if ln.startswith("VmHWM:")).split()[1]) * 1024
    return total
