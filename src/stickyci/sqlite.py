"""SQLite files shared by processes: one way to put them in WAL mode."""

from __future__ import annotations

import fcntl
import sqlite3
from pathlib import Path


def use_wal(path: Path, timeout: float) -> None:
    """Put the SQLite file at ``path`` in WAL mode (kept in the file: readers never block the
    writer, nor it them), creating the file if missing.

    Switching takes a lock SQLite does not wait for (no busy handler): a second process
    switching the same new file at once gets "database is locked" (two ``serve --workers``
    starting, two runs opening a new history). So processes take turns on a lock file beside
    it. ``sqlite3.Error`` propagates, for the caller to name the file.
    """
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        db = sqlite3.connect(path, timeout=timeout)
        try:
            db.execute("PRAGMA journal_mode=WAL")
        finally:
            db.close()
