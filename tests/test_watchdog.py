"""The Dask worker's watchdog: the process groups it was told about die with the process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers import wait_for

CHILD = """
import os, subprocess
from stickyci.pipeline.executors.watchdog import Watchdog
w = Watchdog()
quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "start_new_session": True}
kept = subprocess.Popen(["sleep", "100"], **quiet)
done = subprocess.Popen(["sleep", "100"], **quiet)
w.add(kept.pid)
w.add(done.pid)
w.discard(done.pid)
print(kept.pid, done.pid, flush=True)
os._exit(0)  # no cleanup: as a worker killed with SIGKILL
"""


def _dead(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True


def test_groups_die_with_the_process_unless_discarded() -> None:
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    kept, done = map(int, out.split())
    try:
        wait_for(lambda: _dead(kept), "the registered group to be killed")
        assert not _dead(done)
    finally:
        subprocess.run(["kill", "-9", str(kept), str(done)], capture_output=True, check=False)
