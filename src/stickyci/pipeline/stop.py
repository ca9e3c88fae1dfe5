"""Stopping a job's processes: cancellation of running steps, and guards that outlive a crash.

Steps and disk commands run in process groups of their own, so a timeout or a cancel can end
everything a step started; these are the tools that do it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from typing import Protocol

# How long a process group has between SIGTERM and SIGKILL.
KILL_GRACE = 5.0


class Guard(Protocol):
    """Told about every process group a job starts, so they can die with the job's process."""

    def add(self, pgid: int) -> None:
        """A group started."""

    def discard(self, pgid: int) -> None:
        """A group ended (it has been killed, whatever was left of it)."""


class Stopper:
    """Cancellation of the jobs that share it: stop running steps; teardown steps still run."""

    def __init__(self) -> None:
        self.cancelled = False
        self.procs: set[asyncio.subprocess.Process] = set()

    def cancel(self) -> None:
        """Ctrl-C or SIGTERM (call in the jobs' event loop)."""
        if self.cancelled:
            return
        self.cancelled = True
        for proc in list(self.procs):
            kill_group(proc, signal.SIGTERM)
            asyncio.get_running_loop().call_later(KILL_GRACE, kill_group, proc, signal.SIGKILL)


def kill_group(proc: asyncio.subprocess.Process, sig: int) -> None:
    """Send ``sig`` to the process group ``proc`` leads, if it is still there."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
