"""The server's own SQLite files in its state dir (run reports, history): one way to open them.

Each call is one transaction on a fresh connection (WAL, so readers never wait for the one
writer); an SQLite error becomes a ``StickyError`` naming the file, which clients see only as
its summary.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import StickyError
from ..sqlite import use_wal


class Database:
    """An SQLite file with its schema, created if missing."""

    def __init__(self, path: Path, schema: Sequence[str], what: str) -> None:
        self.path = path
        self._what = what
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            use_wal(path, 30)
        except sqlite3.Error as exc:
            raise self._failed(exc) from exc
        with self._db() as db:
            for statement in schema:
                db.execute(statement)

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30)
        try:
            with db:  # one transaction, committed on success
                yield db
        except sqlite3.Error as exc:
            raise self._failed(exc) from exc
        finally:
            db.close()

    def _failed(self, exc: sqlite3.Error) -> StickyError:
        return StickyError(f"{self._what} {self.path}: {exc}",
                           summary=f"the server's {self._what} failed")
