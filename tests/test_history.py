"""Run history in SQLite, and the ``runs`` command group over it."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest
from click.testing import CliRunner

from stickyci.cli.runs import runs
from stickyci.errors import NotFound, StickyError, UsageError
from stickyci.runs.history import SCHEMA_VERSION, History, record_from_dict
from stickyci.runs.record import DiskRecord, JobRecord, RunRecord, StepRecord
from stickyci.server.database import Database

T0 = 1_800_000_000.0


def make_run(run_dir: Path, run_id: str, started: float = T0, state: str = "success",
             cold: bool = False) -> RunRecord:
    """A small finished run: one warm job (failed when ``state`` is failure), one build."""
    log = run_dir / "logs" / "warm" / "01-make.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("make: *** [deps] Error 2\n")
    job_state = "failure" if state == "failure" else "success"
    warm = JobRecord("warm", "warm", state=job_state,
                     reason="step 'make' exited 2" if job_state == "failure" else "",
                     queued_at=started, started_at=started + 1, finished_at=started + 30,
                     steps=[StepRecord("make", job_state, 2 if job_state == "failure" else 0,
                                       29.0, "logs/warm/01-make.log")],
                     disks=[DiskRecord("shop-deps", "/ws/deps", "overlay", 0.01,
                                       base_cached=True, committed=job_state == "success",
                                       generation=3, stored_bytes=4096)])
    build = JobRecord("build[api]", "build", {"service": "api"}, ["warm"],
                      "skipped" if job_state == "failure" else "success")
    return RunRecord(run_id, "shop", "p.yml", "feedface" * 5, cold, state, started,
                     started + 40, str(run_dir), [warm, build])


def test_record_twice_upserts(tmp_path: Path) -> None:
    h = History(tmp_path / "runs.db")
    run = make_run(tmp_path, "20270101-000000-aaaaaa")
    run.state, run.finished_at = "running", 0.0
    run.jobs[0].state = "running"
    h.record(run)
    assert [(r["state"], r["failed"]) for r in h.list()] == [("running", 0)]
    finished = make_run(tmp_path, "20270101-000000-aaaaaa", state="failure")
    h.record(finished)
    rows = h.list()
    assert len(rows) == 1
    assert rows[0] == {"id": "20270101-000000-aaaaaa", "pipeline": "shop", "sha": "feedface" * 5,
                       "cold": False, "state": "failure", "started_at": T0, "seconds": 40.0,
                       "jobs": 2, "failed": 1, "kind": "warm"}
    assert h.get("20270101-000000-aaaaaa") == finished


def test_list_is_newest_first_and_limited(tmp_path: Path) -> None:
    h = History(tmp_path / "runs.db")
    for i in (2, 0, 3, 1):  # recorded out of order
        h.record(make_run(tmp_path, f"run-{i}", started=T0 + i, cold=i % 2 == 1))
    assert [r["id"] for r in h.list()] == ["run-3", "run-2", "run-1", "run-0"]
    assert [r["id"] for r in h.list(limit=2)] == ["run-3", "run-2"]
    assert [r["cold"] for r in h.list()] == [True, False, True, False]


def test_get_by_id_or_unique_prefix(tmp_path: Path) -> None:
    h = History(tmp_path / "runs.db")
    a, b = make_run(tmp_path, "20270101-000000-aaaaaa"), make_run(tmp_path, "20270101-0000")
    c = make_run(tmp_path, "20270102-120000-bbbbbb", state="failure")
    for run in (a, b, c):
        h.record(run)
    assert h.get("20270102") == c
    assert h.get("20270101-000000-a") == a
    assert h.get("20270101-0000") == b  # an exact id wins over being a prefix of another
    assert h.get("20270102-120000-bbbbbb").to_dict() == c.to_dict()


def test_unknown_and_ambiguous_ids_are_one_line_not_found_errors(tmp_path: Path) -> None:
    h = History(tmp_path / "runs.db")
    for run_id in ("20270101-a", "20270101-b", "X_1"):
        h.record(make_run(tmp_path, run_id))
    with pytest.raises(NotFound, match="no run 'nope'") as unknown:
        h.get("nope")
    with pytest.raises(NotFound, match="matches 2 runs") as ambiguous:
        h.get("2027")
    for err in (unknown.value, ambiguous.value):
        assert "\n" not in str(err)
    assert "20270101-a" in str(ambiguous.value) and "20270101-b" in str(ambiguous.value)
    with pytest.raises(NotFound):
        h.get("x_")  # prefixes are exact: no case folding
    with pytest.raises(NotFound):
        h.get("X%")  # and no wildcards
    with pytest.raises(UsageError):
        h.get("")


def test_database_is_wal_versioned_and_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    History(path)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    History(path)  # reopening migrates nothing
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(StickyError, match="newer than"):
        History(path)


def test_default_path_is_under_the_cache_home(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STICKYCI_CACHE_DIR", str(tmp_path / "cache"))
    assert History().path == tmp_path / "cache" / "runs.db"
    assert (tmp_path / "cache" / "runs.db").exists()


def test_record_from_dict_ignores_derived_and_unknown_fields(tmp_path: Path) -> None:
    run = make_run(tmp_path, "r")
    doc = run.to_dict()
    doc["from_the_future"] = 1
    doc["jobs"][0]["disks"][0]["new_metric"] = 2.5
    assert record_from_dict(doc) == run


WRITERS, RUNS_EACH = 4, 25


def _writer(db: str, n: int, barrier: Barrier) -> None:
    barrier.wait()  # all open a fresh database at once: the schema creation races too
    h = History(Path(db))
    for i in range(RUNS_EACH):
        h.record(RunRecord(f"w{n}-{i}", "p", "p.yml", "sha", False, "success", T0 + i, T0 + i,
                           "/nonexistent"))
        # Everyone also upserts one shared run, as a run's start and end records would.
        h.record(RunRecord("shared", "p", "p.yml", "sha", False, f"by-{n}", T0, T0, "/x"))


def test_concurrent_writers_from_several_processes_lose_nothing(tmp_path: Path) -> None:
    db = str(tmp_path / "runs.db")
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(WRITERS)
    procs = [ctx.Process(target=_writer, args=(db, n, barrier)) for n in range(WRITERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * WRITERS
    rows = History(Path(db)).list(limit=1000)
    assert len(rows) == WRITERS * RUNS_EACH + 1
    assert {r["id"] for r in rows} >= {f"w{n}-{i}" for n in range(WRITERS)
                                       for i in range(RUNS_EACH)}
    assert History(Path(db)).get("shared").state in {f"by-{n}" for n in range(WRITERS)}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache directory, so ``History()`` in the CLI opens a private database."""
    monkeypatch.setenv("STICKYCI_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_runs_ls(tmp_path: Path, cache: Path) -> None:
    empty = CliRunner().invoke(runs, ["ls"])
    assert empty.exit_code == 0 and empty.output == "no runs\n"
    History().record(make_run(tmp_path, "20270101-000000-aaaaaa"))
    History().record(make_run(tmp_path, "20270102-000000-bbbbbb", T0 + 60, "failure", True))
    listed = CliRunner().invoke(runs, ["ls", "--json"])
    assert listed.exit_code == 0
    doc = json.loads(listed.output)
    assert [r["id"] for r in doc] == ["20270102-000000-bbbbbb", "20270101-000000-aaaaaa"]
    assert doc[0]["failed"] == 1 and doc[0]["cold"] is True
    assert len(json.loads(CliRunner().invoke(runs, ["ls", "--limit", "1", "--json"]).output)) == 1
    text = CliRunner().invoke(runs, ["ls"]).output.splitlines()
    assert text[0].split() == ["RUN", "PIPELINE", "STATE", "KIND", "SHA", "JOBS", "FAILED", "TIME",
                               "STARTED"]
    assert text[1].split()[:7] == ["20270102-000000-bbbbbb", "shop", "failure", "cold",
                                   "feedfacefeed", "2", "1"]
    assert CliRunner().invoke(runs, ["ls", "--limit", "0"]).exit_code == 2


def test_runs_recorded_before_kinds_get_theirs_from_the_record(tmp_path: Path) -> None:
    h = History(tmp_path / "runs.db")
    h.record(make_run(tmp_path, "20270101-000000-aaaaaa", cold=True))
    h.record(make_run(tmp_path, "20270102-000000-bbbbbb"))
    with sqlite3.connect(h.path) as db:
        db.execute("UPDATE runs SET kind = ''")  # as the schema migration leaves old rows
    assert [r["kind"] for r in h.list()] == ["warm", "cold"]


def test_a_first_run_on_an_empty_store_is_not_labelled_warm(tmp_path: Path, cache: Path) -> None:
    first = make_run(tmp_path, "20270103-000000-cccccc")
    first.jobs[0].disks[0].fresh = True  # the only disk had nothing committed under its key
    History().record(first)
    assert History().list()[0]["kind"] == "empty"
    assert CliRunner().invoke(runs, ["ls"]).output.splitlines()[1].split()[3] == "empty"
    assert ", empty, sha" in CliRunner().invoke(runs, ["show", "latest"]).output


def test_runs_show(tmp_path: Path, cache: Path) -> None:
    run = make_run(tmp_path, "20270102-000000-bbbbbb", state="failure")
    History().record(run)
    shown = CliRunner().invoke(runs, ["show", "20270102"])
    assert shown.exit_code == 0
    out = shown.output
    assert out.startswith("run 20270102-000000-bbbbbb: shop FAILURE, warm, sha feedfacefeed")
    assert "FAILURE warm: step 'make' exited 2" in out
    assert f"log {tmp_path / 'logs/warm/01-make.log'}" in out
    table = out[out.index("JOB "):].splitlines()
    assert out.index("FAILURE warm") < out.index("JOB ")  # failures before the table
    assert table[0].split() == ["JOB", "STATE", "QUEUED", "RAN", "STEPS", "MOUNT", "COMMIT",
                                "STORED", "CACHE"]
    assert table[1].split() == ["warm", "FAIL", "1.0s", "29.0s", "29.0s", "10ms", "-", "4.0",
                                "KiB", "cached"]
    assert table[2].split() == ["build[api]", "skip", "-", "-", "-", "-", "-", "-", "-"]
    assert "CACHE, per disk: empty" in out
    as_json = CliRunner().invoke(runs, ["show", "20270102-000000-bbbbbb", "--json"])
    assert json.loads(as_json.output) == run.to_dict()
    missing = CliRunner().invoke(runs, ["show", "nope"])
    assert missing.exit_code != 0 and isinstance(missing.exception, NotFound)


def _open_server_db(path: str, barrier: Barrier) -> None:
    barrier.wait()  # every worker of a starting `serve --workers` opens it at once
    Database(Path(path), ["CREATE TABLE IF NOT EXISTS t (a INTEGER)"], "test database")


def test_a_new_server_database_opened_by_several_processes_at_once_opens_in_all(
        tmp_path: Path) -> None:
    """Switching a new SQLite file to WAL takes a lock SQLite does not wait for: a worker of
    `serve --workers 2` died of "database is locked" at start-up before they took turns."""
    ctx = multiprocessing.get_context("fork")
    for n in range(10):
        db = str(tmp_path / f"{n}.db")
        barrier = ctx.Barrier(4)
        procs = [ctx.Process(target=_open_server_db, args=(db, barrier)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        assert [p.exitcode for p in procs] == [0] * 4
        with sqlite3.connect(db) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
