"""Run history: one SQLite row per run, with the full record as JSON."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import NotFound, StickyError, UsageError
from ..paths import cache_home
from ..sqlite import use_wal
from .record import (
    FAILURE,
    TIMED_OUT,
    DiskRecord,
    JobRecord,
    RunRecord,
    StepRecord,
)

# Migration N takes the database from user_version N to N + 1; append, never edit.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    ("""CREATE TABLE runs (
        id TEXT PRIMARY KEY, pipeline TEXT NOT NULL, sha TEXT NOT NULL, cold INTEGER NOT NULL,
        state TEXT NOT NULL, started_at REAL NOT NULL, seconds REAL NOT NULL,
        jobs INTEGER NOT NULL, failed INTEGER NOT NULL, record TEXT NOT NULL)""",
     "CREATE INDEX runs_started ON runs (started_at)"),
    # How the disks started (RunRecord.kind); '' for runs recorded before.
    ("ALTER TABLE runs ADD COLUMN kind TEXT NOT NULL DEFAULT ''",),
)
SCHEMA_VERSION = len(MIGRATIONS)
# Runs on one machine finish together (a matrix of pipelines, a cold/warm bench): wait for
# the write lock rather than fail, for longer than any single write can hold it.
BUSY_TIMEOUT = 30.0
# Counted as failed, as ``stickyci run`` counts them; a cancelled job did not fail.
_FAILED = (FAILURE, TIMED_OUT)
_LIST_COLUMNS = ("id", "pipeline", "sha", "cold", "state", "started_at", "seconds", "jobs",
                 "failed", "kind")

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


def _build(cls: type[T], doc: dict[str, Any]) -> T:
    # Keep only the fields the class has: derived values (``seconds``) and fields a newer
    # stickyci added must not make an old record unreadable.
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in doc.items() if k in names})


def record_from_dict(doc: dict[str, Any]) -> RunRecord:
    """Rebuild a ``RunRecord`` from its ``to_dict`` form."""
    jobs = []
    for jd in doc.get("jobs", []):
        job = _build(JobRecord, jd)
        job.steps = [_build(StepRecord, s) for s in jd.get("steps", [])]
        job.disks = [_build(DiskRecord, d) for d in jd.get("disks", [])]
        jobs.append(job)
    run = _build(RunRecord, doc)
    run.jobs = jobs
    return run


class History:
    """Runs recorded on this machine, in ``runs.db`` under the cache directory by default."""

    def __init__(self, path: Path | None = None) -> None:
        if path is None:
            path = cache_home() / "runs.db"
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._migrate()

    @contextlib.contextmanager
    def _db(self, *, write: bool = False) -> Iterator[sqlite3.Connection]:
        """A connection inside one transaction, committed on success and always closed."""
        # isolation_level=None: we issue BEGIN ourselves, so a writer takes the lock up front
        # (BEGIN IMMEDIATE) and waits on the busy timeout, instead of failing when it upgrades
        # a read lock that another writer got to first.
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StickyError(f"run history {self.path}: {exc}") from exc
        finally:
            db.close()

    def _migrate(self) -> None:
        """Switch the file to WAL and bring its schema up to date."""
        try:
            use_wal(self.path, BUSY_TIMEOUT)
        except sqlite3.Error as exc:
            raise StickyError(f"run history {self.path}: {exc}") from exc
        self._upgrade()

    def _upgrade(self) -> None:
        with self._db(write=True) as db:
            version: int = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StickyError(f"run history {self.path} has schema {version}, newer than "
                                  f"this stickyci's {SCHEMA_VERSION}; upgrade stickyci")
            for migration in MIGRATIONS[version:]:
                for statement in migration:
                    db.execute(statement)
            if version < SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def record(self, run: RunRecord) -> None:
        """Insert a run, or update it: a run is recorded when it starts and when it ends."""
        failed = sum(1 for j in run.jobs if j.state in _FAILED)
        row = (run.id, run.pipeline, run.sha, int(run.cold), run.state, run.started_at,
               run.seconds, len(run.jobs), failed, run.kind, json.dumps(run.to_dict()))
        with self._db(write=True) as db:
            db.execute(
                f"INSERT INTO runs ({', '.join(_LIST_COLUMNS)}, record) "
                f"VALUES ({', '.join('?' * len(row))}) ON CONFLICT (id) DO UPDATE SET "
                + ", ".join(f"{c} = excluded.{c}" for c in (*_LIST_COLUMNS[1:], "record")),
                row)

    def list(self, limit: int = 20) -> list[dict[str, Any]]:
        """The newest ``limit`` runs first: id, pipeline, sha, cold, state, started_at,
        seconds, jobs, failed (jobs that failed or timed out) and kind (``RunRecord.kind``)."""
        with self._db() as db:
            rows = db.execute(f"SELECT {', '.join(_LIST_COLUMNS)} FROM runs "
                              "ORDER BY started_at DESC, id DESC LIMIT ?", (limit,)).fetchall()
            out = [dict(zip(_LIST_COLUMNS, r, strict=True)) for r in rows]
            for r in out:
                r["cold"] = bool(r["cold"])
                if not r["kind"]:  # recorded before kinds were
                    text = db.execute("SELECT record FROM runs WHERE id = ?",
                                      (r["id"],)).fetchone()[0]
                    r["kind"] = record_from_dict(json.loads(text)).kind
        return out

    def get(self, run_id: str) -> RunRecord:
        """A run by its id, by a prefix of it that names only one run, or ``latest``."""
        if not run_id:
            raise UsageError("give a run id (or its start); `stickyci runs ls` lists them")
        with self._db() as db:
            if run_id == "latest":  # no id starts with a letter
                ids = [r[0] for r in db.execute(
                    "SELECT id FROM runs ORDER BY started_at DESC, id DESC LIMIT 1")]
                if not ids:
                    raise NotFound(f"no runs in {self.path} yet; start one with `stickyci run "
                                   "PIPELINE.yml`")
            else:
                ids = [r[0] for r in db.execute("SELECT id FROM runs WHERE id = ?",
                                                (run_id,))]
            if not ids:
                # substr, not LIKE: LIKE ignores case and treats _ and % as wildcards.
                ids = [r[0] for r in db.execute(
                    "SELECT id FROM runs WHERE substr(id, 1, ?) = ? ORDER BY id",
                    (len(run_id), run_id))]
            if not ids:
                raise NotFound(f"no run {run_id!r} in {self.path}; `stickyci runs ls` lists "
                               "them")
            if len(ids) > 1:
                some = ", ".join(ids[:3]) + (", …" if len(ids) > 3 else "")
                raise NotFound(f"run id prefix {run_id!r} matches {len(ids)} runs ({some}); "
                               "give more of it")
            text: str = db.execute("SELECT record FROM runs WHERE id = ?", ids).fetchone()[0]
        doc: dict[str, Any] = json.loads(text)
        return record_from_dict(doc)
