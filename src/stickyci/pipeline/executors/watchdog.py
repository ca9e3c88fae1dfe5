"""The watchdog of a Dask worker: a helper process that kills the jobs' process groups when the
worker process dies, however it dies.

Run as ``python -m stickyci.pipeline.executors.watchdog``; :class:`Watchdog` starts it and
feeds it one line per group on its standard input: ``+PGID`` when a group starts, ``-PGID``
when it ends. End of input (the kernel closes the pipe when the worker dies) makes it kill
every group still registered.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable


class Watchdog:
    """A helper process that kills the jobs' process groups when this worker process dies.

    Steps and disk commands run in sessions of their own (timeouts kill a whole step), so they
    would outlive a killed worker: a step would keep its mounts busy, and a commit would go on
    to move the ref of a job that is already being retried elsewhere. The helper is told each
    group as it starts and ends, and started again (with every group still live) if it died.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None
        self._groups: set[int] = set()

    def add(self, pgid: int) -> None:
        """Kill group ``pgid`` if this process dies."""
        with self._lock:
            self._groups.add(pgid)
            self._send(f"+{pgid}\n")

    def discard(self, pgid: int) -> None:
        """Group ``pgid`` is over."""
        with self._lock:
            self._groups.discard(pgid)
            self._send(f"-{pgid}\n")

    def _send(self, line: str) -> None:
        for _ in range(2):
            if self._proc is None or self._proc.poll() is not None:
                # Its own session: a Ctrl-C meant for `dask worker` must not stop it first.
                self._proc = subprocess.Popen([sys.executable, "-m", __name__],
                                              stdin=subprocess.PIPE, text=True,
                                              start_new_session=True)
                line = "".join(f"+{g}\n" for g in self._groups)
            assert self._proc.stdin is not None
            try:
                self._proc.stdin.write(line)
                self._proc.stdin.flush()
                return
            except BrokenPipeError:
                self._proc = None


def watch(lines: Iterable[str]) -> None:
    """Follow ``+PGID`` / ``-PGID`` lines to their end, then kill every group still listed."""
    groups: set[int] = set()
    for line in lines:
        (groups.add if line[0] == "+" else groups.discard)(int(line[1:]))
    for g in groups:
        with contextlib.suppress(OSError):
            os.killpg(g, signal.SIGKILL)


if __name__ == "__main__":
    watch(sys.stdin)
