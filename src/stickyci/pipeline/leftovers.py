"""Processes a step left behind when its shell exited: found, named, stopped.

A step's processes carry a tracking id in their environment (``STICKYCI_TRACKING_ID``), as
GitHub's hosted runner tags a job's processes with ``RUNNER_TRACKING_ID`` to stop the orphans
when the job ends. A leftover is any live process that still carries the id, is still in the
step's process group, or still holds the step's output pipe for writing: a daemon that called
``setsid`` keeps the id, and one that also cleared its environment still holds the pipe unless
it redirected its output. Only a process that does all three escapes. (The read end is the
runner's, and so, until they exec, every process it forks has it: another job's step being
started is not this step's leftover.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Iterable
from dataclasses import dataclass

from .. import procs

TRACKING_VAR = "STICKYCI_TRACKING_ID"
# How long stopped processes have between SIGTERM and SIGKILL, and how often we look.
STOP_GRACE = 5.0
_POLL = 0.02


@dataclass(frozen=True, slots=True)
class Leftover:
    """A live process a step left behind."""

    pid: int
    pgid: int
    command: str  # its command line, shortened

    def __str__(self) -> str:
        return f"{self.pid} ({self.command})"


@dataclass(frozen=True, slots=True)
class Traces:
    """What marks a step's processes: the start of their tracking id, their process groups,
    the inodes of their output pipes."""

    tracking: str
    groups: frozenset[int] = frozenset()
    pipes: frozenset[int] = frozenset()


def find(traces: Traces) -> list[Leftover]:
    """Every live process (but this one) that ``traces`` mark, by pid."""
    tag = f"\0{TRACKING_VAR}={traces.tracking}".encode()
    pipes = {f"pipe:[{ino}]" for ino in traces.pipes}
    out = []
    for pid in procs.pids():
        try:
            state, pgid = _stat(pid)
            if state in "ZX":  # dead, waiting to be reaped: nothing left to stop
                continue
            if (pgid in traces.groups or _tagged(pid, tag)
                    or (pipes and procs.writes_to(pid, pipes))):
                out.append(Leftover(pid, pgid, procs.command(pid)))
        except (OSError, ValueError):
            continue  # gone meanwhile, or not ours to read
    return out


async def stop(traces: Traces, grace: float = STOP_GRACE) -> list[Leftover]:
    """Stop what ``traces`` mark: SIGTERM, then SIGKILL for what is still there after
    ``grace`` seconds (looked for again: a process may fork while it is stopped).

    Returns the processes found first, the ones to name.
    """
    found = await asyncio.to_thread(find, traces)
    if not found:
        return []
    _signal(found, signal.SIGTERM)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while any(map(_alive, found)) and loop.time() < deadline:
        await asyncio.sleep(_POLL)  # polling exits with a deadline: they are not our children
    _signal(await asyncio.to_thread(find, traces), signal.SIGKILL)
    return found


def describe(found: Iterable[Leftover]) -> str:
    """``PID (command), …`` for a log line."""
    return ", ".join(map(str, found))


def _signal(found: Iterable[Leftover], sig: int) -> None:
    for p in found:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p.pid, sig)


def _alive(p: Leftover) -> bool:
    try:
        return _stat(p.pid)[0] not in "ZX"
    except (OSError, ValueError):
        return False


def _stat(pid: int) -> tuple[str, int]:
    """State letter and process group of ``pid``."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    # The command name, in parentheses, may hold spaces and parentheses itself.
    fields = data[data.rindex(b")") + 2:].split()
    return fields[0].decode(), int(fields[2])


def _tagged(pid: int, tag: bytes) -> bool:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return tag in b"\0" + f.read()
