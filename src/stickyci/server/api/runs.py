"""Run reports (``/v1/runs``): runners send their runs as they go, the dashboard reads them.

Runs are kept in ``runs.db``, an SQLite file in the server's state directory, not in the store:
they are the server's own record of what ran (like its tokens), listed newest first and
filtered by pipeline, state and sha on every dashboard view, which an index answers in
milliseconds over many thousands of runs where a listing of store objects (S3) would not; and
the store's objects and refs keep their own rules (content-addressed, garbage-collected).

The scope of a run is its pipeline's name: a token may report (write) runs of the pipelines its
``write`` patterns match, and see (read) those its read patterns match, as it would a disk of
that key. Every report is validated at the boundary with the run record's own types.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ...errors import NotFound, UsageError
from ...runs import (
    FAILURE,
    FINISHED,
    LOST,
    PENDING,
    QUEUED,
    RUNNING,
    SUCCESS,
    TIMED_OUT,
    RunRecord,
    RunReport,
)
from ...store import protocol as p
from ..auth import Permission, Principal
from ..database import Database
from ..state import Api, ServerState, read_limited

RUNS_DB = "runs.db"
MAX_REPORT = 8 << 20
"""The largest report accepted: a run of thousands of jobs with every log tail fits."""
MAX_LIST = 500
# Run ids as `stickyci run` makes them (20261130-031502-a1b2c3), with room for other tools.
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_RUN_STATES = frozenset({RUNNING, *FINISHED})
_JOB_STATES = frozenset({PENDING, QUEUED, RUNNING, *FINISHED})
_ATTEMPT_STATES = _JOB_STATES | {LOST}
_FAILED = (FAILURE, TIMED_OUT)
_SCHEMA = (
    # The columns a listing shows, so a listing parses no report; the report whole for a page.
    """CREATE TABLE IF NOT EXISTS runs (
        id TEXT PRIMARY KEY, pipeline TEXT NOT NULL, sha TEXT NOT NULL, state TEXT NOT NULL,
        kind TEXT NOT NULL, cold INTEGER NOT NULL, started_at REAL NOT NULL,
        finished_at REAL NOT NULL, seconds REAL NOT NULL, jobs INTEGER NOT NULL,
        failed INTEGER NOT NULL, report TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS runs_started ON runs (started_at DESC, id DESC)",
    "CREATE INDEX IF NOT EXISTS runs_pipeline ON runs (pipeline, started_at DESC)",
)
_LIST_COLUMNS = ("id", "pipeline", "sha", "state", "kind", "cold", "started_at", "finished_at",
                 "seconds", "jobs", "failed")


@dataclass(frozen=True, slots=True)
class Filter:
    """Which runs a listing shows: exact pipeline and state, and a prefix of the sha."""

    pipeline: str = ""
    state: str = ""
    sha: str = ""
    limit: int = 100


class RunStore(Database):
    """The server's runs: one row per run, its last report as JSON."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, _SCHEMA, "run database")

    def put(self, report: RunReport, who: Principal) -> None:
        """Store a run's report; a run already there under another pipeline must be one the
        token may write too, so no token overwrites another pipeline's run."""
        run = report.record
        row = (run.id, run.pipeline, run.sha, run.state, run.kind, int(run.cold),
               run.started_at, run.finished_at, run.seconds, len(run.jobs),
               sum(1 for j in run.jobs if j.state in _FAILED), report.model_dump_json())
        with self._db() as db:
            old = db.execute("SELECT pipeline FROM runs WHERE id = ?", (run.id,)).fetchone()
            if old is not None and old[0] != run.pipeline:
                who.require(Permission.WRITE, old[0], f"runs of pipeline {old[0]!r}")
            db.execute(
                f"INSERT INTO runs ({', '.join(_LIST_COLUMNS)}, report) "
                f"VALUES ({', '.join('?' * len(row))}) ON CONFLICT (id) DO UPDATE SET "
                + ", ".join(f"{c} = excluded.{c}" for c in (*_LIST_COLUMNS[1:], "report")),
                row)

    def get(self, run_id: str, who: Principal) -> RunReport:
        """One run's last report, if the token may read its pipeline."""
        with self._db() as db:
            row = db.execute("SELECT pipeline, report FROM runs WHERE id = ?",
                             (run_id,)).fetchone()
        # The same answer for a run that is not there and one the token may not see.
        if row is None or not who.scope.allows(Permission.READ, row[0]):
            raise NotFound(f"no run {run_id!r} that this token may read")
        return RunReport.model_validate_json(row[1])

    def pipelines(self, who: Principal) -> list[str]:
        """The pipelines with runs that the token may read."""
        with self._db() as db:
            names = [r[0] for r in db.execute("SELECT DISTINCT pipeline FROM runs")]
        return sorted(n for n in names if who.scope.allows(Permission.READ, n))

    def finished(self, who: Principal, pipeline: str, kind: str,
                 limit: int = 20) -> list[RunRecord]:
        """The newest ``limit`` successful runs of a pipeline of one kind (``cold``, ``warm``),
        if the token may read the pipeline."""
        if not who.scope.allows(Permission.READ, pipeline):
            return []
        with self._db() as db:
            rows = db.execute("SELECT report FROM runs WHERE pipeline = ? AND kind = ? AND "
                              "state = ? ORDER BY started_at DESC LIMIT ?",
                              (pipeline, kind, SUCCESS, limit)).fetchall()
        return [RunReport.model_validate_json(r[0]).record for r in rows]

    def list(self, who: Principal, f: Filter) -> list[dict[str, Any]]:
        """The newest runs first that the token may read and ``f`` selects: id, pipeline, sha,
        state, kind, cold, started_at, finished_at, seconds, jobs and failed (how many)."""
        where: list[str] = []
        args: list[str | int] = []
        if not who.scope.admin:
            allowed = self.pipelines(who)
            if f.pipeline:
                allowed = [n for n in allowed if n == f.pipeline]
            where.append(f"pipeline IN ({', '.join('?' * len(allowed))})")
            args += allowed
        elif f.pipeline:
            where.append("pipeline = ?")
            args.append(f.pipeline)
        if f.state:
            where.append("state = ?")
            args.append(f.state)
        if f.sha:
            # substr, not LIKE: LIKE ignores case and treats _ and % as wildcards.
            where.append("substr(sha, 1, ?) = ?")
            args += [len(f.sha), f.sha]
        sql = (f"SELECT {', '.join(_LIST_COLUMNS)} FROM runs"
               + (" WHERE " + " AND ".join(where) if where else "")
               + " ORDER BY started_at DESC, id DESC LIMIT ?")
        with self._db() as db:
            rows = db.execute(sql, (*args, min(f.limit, MAX_LIST))).fetchall()
        out = [dict(zip(_LIST_COLUMNS, r, strict=True)) for r in rows]
        for r in out:
            r["cold"] = bool(r["cold"])
        return out


def check_report(report: RunReport) -> RunReport:
    """Refuse what the record's types let through but no runner sends: an id that is not a
    run id, an unknown state, a job id twice, a log tail of a job or step that is not there."""
    run = report.record
    if not _RUN_ID.match(run.id):
        raise UsageError(f"run id {run.id!r}: use letters, digits, '.', '_' and '-'")
    if not run.pipeline.strip() or len(run.pipeline) > 200:
        raise UsageError("a run's pipeline name must be 1 to 200 characters")
    if run.state not in _RUN_STATES:
        raise UsageError(f"run state {run.state!r} is not one of {sorted(_RUN_STATES)}")
    steps: dict[str, int] = {}
    for job in run.jobs:
        if job.id in steps:
            raise UsageError(f"job {job.id!r} appears twice in run {run.id}")
        steps[job.id] = len(job.steps)
        states = {job.state, *(s.state for s in job.steps)}
        if not states <= _JOB_STATES or not {a.state for a in job.attempts} <= _ATTEMPT_STATES:
            raise UsageError(f"job {job.id!r}: unknown state in {sorted(states)}")
    for tail in report.tails:
        if tail.step >= steps.get(tail.job, 0):
            raise UsageError(f"log tail of job {tail.job!r} step {tail.step}: no such step")
    return report


def parse_report(data: bytes) -> RunReport:
    """A report body as typed values, or a ``UsageError`` naming the first field at fault."""
    try:
        report = RunReport.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "body"
        raise UsageError(f"invalid run report: {where}: {first['msg']}") from exc
    return check_report(report)


def routes(server: ServerState) -> list[Route]:
    """The run reports' routes."""
    api = Runs(server, RunStore(server.cfg.state_dir / RUNS_DB))
    return [
        Route(f"{p.PREFIX}/runs", api.run_list, methods=["GET"]),
        Route(f"{p.PREFIX}/runs/{{run_id}}", api.run_get, methods=["GET"]),
        Route(f"{p.PREFIX}/runs/{{run_id}}", api.run_put, methods=["PUT"]),
    ]


def filter_of(request: Request) -> Filter:
    """A listing's filter from the query string (``pipeline``, ``state``, ``sha``, ``limit``)."""
    q = request.query_params
    limit = q.get("limit", "100")
    if not limit.isdigit() or not 0 < int(limit) <= MAX_LIST:
        raise UsageError(f"limit={limit!r}: a number from 1 to {MAX_LIST}")
    return Filter(pipeline=q.get("pipeline", ""), state=q.get("state", ""),
                  sha=q.get("sha", "").strip().lower(), limit=int(limit))


class Runs(Api):
    """The handlers of the run reports."""

    def __init__(self, server: ServerState, store: RunStore) -> None:
        super().__init__(server)
        self.store = store

    async def run_put(self, request: Request) -> Response:
        """``PUT /v1/runs/ID``: a run's report, the whole of it each time."""
        who = self.who(request)
        report = parse_report(await read_limited(request, MAX_REPORT, "a run report"))
        run = report.record
        if run.id != request.path_params["run_id"]:
            raise UsageError(f"the report is of run {run.id!r}, sent to "
                             f"{request.path_params['run_id']!r}")
        who.require(Permission.WRITE, run.pipeline, f"runs of pipeline {run.pipeline!r}")
        await self.call(self.store.put, report, who)
        return Response(status_code=204)

    async def run_get(self, request: Request) -> Response:
        """``GET /v1/runs/ID``: a run's last report."""
        who = self.who(request)
        report = await self.call(self.store.get, request.path_params["run_id"], who)
        return Response(report.model_dump_json(), media_type="application/json")

    async def run_list(self, request: Request) -> Response:
        """``GET /v1/runs``: the newest runs the token may read, filtered."""
        who = self.who(request)
        runs = await self.call(self.store.list, who, filter_of(request))
        return Response(json.dumps({"runs": runs}),
                        media_type="application/json")
