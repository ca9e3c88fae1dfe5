"""Where a server's time goes: py-spy sampling a process while a benchmark drives it, and the
samples summed by function."""

from __future__ import annotations

import collections
import contextlib
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from .proc import log


def py_spy() -> str | None:
    """The py-spy next to this interpreter (the venv's), else on the PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


@contextlib.contextmanager
def spying(pid: int, raw: Path, rate: int = 100) -> Iterator[None]:
    """``py-spy record -f raw`` on ``pid`` (every thread, idle ones left out) while the block
    runs; the collapsed stacks land in ``raw``."""
    exe = py_spy()
    if exe is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    spy = subprocess.Popen([exe, "record", "--full-filenames", "-r", str(rate), "-f", "raw",
                            "-o", str(raw), "-p", str(pid)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output when interrupted
        try:
            _, err = spy.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
            _, err = spy.communicate()
        if not raw.exists():
            log(f"py-spy wrote nothing: {err.decode(errors='replace')[-500:]}")


def _stacks(raw: Path) -> Iterator[tuple[list[str], int]]:
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if n.isdigit():
            # Line numbers split one function into many entries; a thread's name is no frame.
            frames = [short(re.sub(r":\d+\)$", ")", f)) for f in stack.split(";")
                      if not f.startswith(("thread ", "process "))]
            yield frames, int(n)


def short(frame: str) -> str:
    """``function (path)`` with the path cut to what follows ``src/`` or ``site-packages/``,
    or to the file name, so a frame reads like ``cut (stickyci/chunking.py)``."""
    name, sep, path = frame.partition(" (")
    if not sep:
        return frame
    for root in ("/src/", "/site-packages/", "/lib/python3."):
        if root in path:
            path = path.rsplit(root, 1)[1]
            if root == "/lib/python3.":
                path = path.partition("/")[2]
            break
    else:
        path = path.rsplit("/", 1)[-1]
    return f"{name} ({path}"


# Threads parked on a lock or a queue that py-spy does not recognise as idle: not work.
WAITING = ("Condition.wait (threading.py)", "_worker (concurrent/futures/thread.py)")


def top_self(raw: Path, n: int) -> list[tuple[str, float]]:
    """The ``n`` functions with the most samples at the top of the stack, as shares of the
    samples of threads not parked (``WAITING``)."""
    counts: collections.Counter[str] = collections.Counter()
    for frames, k in _stacks(raw):
        if frames and frames[-1] not in WAITING:
            counts[frames[-1]] += k
    total = sum(counts.values()) or 1
    return [(name, c / total) for name, c in counts.most_common(n)]


def top_inclusive(raw: Path, n: int, within: str,
                  skip: tuple[str, ...] = ("/cli/", "/__main__.py")) -> list[tuple[str, float]]:
    """The ``n`` functions whose file path contains ``within`` (and none of ``skip``: the
    entry points every stack starts with) with the most samples anywhere in the stack (each
    counted once per stack), as shares of the samples of threads not parked."""
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for frames, k in _stacks(raw):
        if not frames or frames[-1] in WAITING:
            continue
        total += k
        for name in {f for f in frames if within in f and not any(s in f for s in skip)}:
            counts[name] += k
    return [(name, c / (total or 1)) for name, c in counts.most_common(n)]
