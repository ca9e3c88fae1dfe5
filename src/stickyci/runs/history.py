"""Run history: one SQLite row per run, with the full record as JSON."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from ..errors import NotFound
from ..pipeline.record import (
    DiskRecord,
    JobRecord,
    RunRecord,
    StepRecord,
)
from ..store import cache_home

SCHEMA_VERSION = 1


def record_from_dict(doc: dict[str, Any]) -> RunRecord:
    """Rebuild a ``RunRecord`` from its ``to_dict`` form."""
    doc = dict(doc)
    doc.pop("seconds", None)
    jobs = []
    for jd in doc.pop("jobs"):
        jd = dict(jd)
        jd.pop("queue_seconds", None)
        jd.pop("run_seconds", None)
        jd["steps"] = [StepRecord(**s) for s in jd["steps"]]
        jd["disks"] = [DiskRecord(**d) for d in jd["disks"]]
        jobs.append(JobRecord(**jd))
    return RunRecord(jobs=jobs, **doc)


class History:
    """Runs recorded on this machine."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or cache_home() / "runs.db"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            if db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                db.execute("""CREATE TABLE IF NOT EXISTS runs (
                    id TEXT PRIMARY KEY, pipeline TEXT, sha TEXT, cold INTEGER, state TEXT,
                    started_at REAL, seconds REAL, jobs INTEGER, failed INTEGER, record TEXT)""")
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _db(self) -> sqlite3.Connection:
        # Several runs on one machine write at once: wait for the lock rather than fail.
        db = sqlite3.connect(self.path, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        return db

    def record(self, run: RunRecord) -> None:
        """Insert or update a run."""
        failed = sum(1 for j in run.jobs if j.state in ("failure", "timed_out"))
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO runs VALUES (?,?,?,?,?,?,?,?,?,?)",
                       (run.id, run.pipeline, run.sha, int(run.cold), run.state,
                        run.started_at, run.seconds, len(run.jobs), failed,
                        json.dumps(run.to_dict())))

    def list(self, limit: int = 20) -> list[dict[str, Any]]:
        """The newest runs first."""
        with self._db() as db:
            rows = db.execute("SELECT id, pipeline, sha, cold, state, started_at, seconds, jobs, "
                              "failed FROM runs ORDER BY started_at DESC LIMIT ?", (limit,))
            names = [c[0] for c in rows.description]
            return [dict(zip(names, r, strict=True)) | {"cold": bool(r[3])} for r in rows]

    def get(self, run_id: str) -> RunRecord:
        """A run by id or by a unique prefix of it."""
        with self._db() as db:
            rows = db.execute("SELECT id, record FROM runs WHERE id LIKE ? ESCAPE '\\'",
                              (run_id.replace("%", "\\%").replace("_", "\\_") + "%",)
                              ).fetchall()
        exact = [r for r in rows if r[0] == run_id]
        if exact:
            rows = exact
        if not rows:
            raise NotFound(f"no run {run_id!r}; `stickyci runs ls` lists them")
        if len(rows) > 1:
            raise NotFound(f"run id prefix {run_id!r} matches {len(rows)} runs; give more of it")
        return record_from_dict(json.loads(rows[0][1]))
