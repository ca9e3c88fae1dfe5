"""Job workspaces on a Dask worker: where they are, which worker process owns each, and clearing
those of a worker process that died (its processes, its mounts, its files).

A workspace ``jobs/<run>/<slug>.<attempt>`` under the worker's cache directory has an
``.owner`` file beside it naming the process that runs it (pid and start time, so a pid reused
after a reboot does not pass for it). A workspace whose owner is gone is stale.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from pathlib import Path

from ...disks import all_mounts, release_holders
from ...errors import StickyError
from ...fsutil import remove_tree
from ...paths import cache_home

log = logging.getLogger("stickyci")


def jobs_root() -> Path:
    """Where this worker's job workspaces are: under its own cache directory."""
    return cache_home() / "jobs"


def claim(ws: Path) -> None:
    """Record this process as the owner of the workspace ``ws`` (created by the job)."""
    ws.parent.mkdir(parents=True, exist_ok=True)
    ws.with_name(f"{ws.name}.owner").write_text(_identity(os.getpid()) or "")


def sweep_stale() -> None:
    """Clear the workspaces left by a worker process that died: processes, mounts, files."""
    for owner in jobs_root().glob("*/*.owner"):
        try:
            text = owner.read_text()
        except OSError:
            continue
        if text and _identity(int(text.split()[0])) == text:
            continue  # its worker is alive (another worker process may share this cache)
        ws = owner.with_suffix("")
        with contextlib.suppress(StickyError, OSError):
            release_holders(ws, kill=True)
        for m in all_mounts():
            if Path(m.path).is_relative_to(ws):
                subprocess.run([sys.executable, "-m", "stickyci", "disk", "unmount", m.path,
                                "--kill-holders"], capture_output=True, check=False)
        log.info("removed the workspace %s of a worker that died", ws)
        remove_tree(ws)
        forget(ws)


def forget(ws: Path) -> None:
    """Remove the files beside a workspace, and its run's directory once empty."""
    for path in (ws.with_name(f"{ws.name}.owner"), ws.with_name(f"{ws.name}.outputs")):
        path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        ws.parent.rmdir()


def _identity(pid: int) -> str | None:
    """``PID STARTTIME`` of a live process: a pid reused after a reboot does not match."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else f"{pid} {fields[19]}"
