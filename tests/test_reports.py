"""Run summaries (failures first) and run history (SQLite)."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from stickyci.cli.runs import runs
from stickyci.errors import NotFound
from stickyci.pipeline.record import DiskRecord, JobRecord, RunRecord, StepRecord
from stickyci.pipeline.summary import render_markdown, write_reports
from stickyci.runs.history import History


def _run(tmp_path: Path, run_id: str = "20261129-000000-aaaaaa", started: float = 1.0) -> RunRecord:
    log = tmp_path / "logs" / "warm" / "01-build.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("".join(f"line {i}\n" for i in range(100)) + "error: libcore.a missing\n")
    warm = JobRecord("warm-deps", "warm-deps", state="failure", reason="step 'build' exited 2",
                     started_at=started, finished_at=started + 3,
                     steps=[StepRecord("build", "failure", 2, 3.0, str(log.relative_to(tmp_path)))])
    build = JobRecord("build[api]", "build", {"service": "api"}, ["warm-deps"], "skipped",
                      "needs not successful: warm-deps")
    raced = JobRecord("pack", "pack", state="success", started_at=started, finished_at=started + 1,
                      disks=[DiskRecord("shared", "/w/d", "overlay", 0.01, committed=True,
                                        generation=4, stored_bytes=2048,
                                        raced_with=[{"gen": 3, "committer": "hostB:77"}])])
    return RunRecord(run_id, "shop", "p.yml", "abcdef1234567890", False, "failure", started,
                     started + 5, str(tmp_path), [build, raced, warm])


def test_failures_come_first_with_the_log_tail(tmp_path: Path) -> None:
    text = render_markdown(_run(tmp_path))
    assert text.startswith("# shop: FAILURE")
    failures, jobs = text.index("## Failures"), text.index("## Jobs")
    assert failures < jobs
    assert text.index("### warm-deps: failure") < jobs
    assert "error: libcore.a missing" in text
    assert "line 99" in text and "line 10\n" not in text  # only the tail
    assert "build[api]" not in text[:jobs]  # skipped jobs are not failures


def test_races_name_both_commits(tmp_path: Path) -> None:
    text = render_markdown(_run(tmp_path))
    race = text[text.index("## Races"):text.index("## Jobs")]
    assert "shared" in race and "generation 4" in race and "hostB:77" in race
    assert "last write wins" in race


def test_reports_written_and_step_summary_appended(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    step_summary = tmp_path / "gh.md"
    step_summary.write_text("earlier content\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step_summary))
    run = _run(tmp_path)
    md, js = write_reports(run)
    assert md.read_text() == render_markdown(run)
    assert json.loads(js.read_text())["jobs"][2]["run_seconds"] == 3
    assert step_summary.read_text() == "earlier content\n" + md.read_text()


def test_history_upserts_lists_newest_first_and_finds_prefixes(tmp_path: Path) -> None:
    h = History(tmp_path / "runs.db")
    first = _run(tmp_path, "20261129-000000-aaaaaa", 1.0)
    first.state = "running"
    h.record(first)
    first.state = "failure"
    h.record(first)
    h.record(_run(tmp_path, "20261129-000100-bbbbbb", 2.0))
    rows = h.list()
    assert [r["id"] for r in rows] == ["20261129-000100-bbbbbb", "20261129-000000-aaaaaa"]
    assert rows[1]["state"] == "failure" and rows[1]["failed"] == 1
    got = h.get("20261129-0000")
    assert got.to_dict() == first.to_dict()
    with pytest.raises(NotFound, match="matches 2 runs"):
        h.get("20261129")
    with pytest.raises(NotFound, match="no run"):
        h.get("nope")


def _writer(args: tuple[str, int]) -> None:
    db, n = args
    h = History(Path(db))
    for i in range(20):
        h.record(RunRecord(f"run-{n}-{i}", "p", "f", "s", False, "success", time.time(), 0, "/"))


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    db = str(tmp_path / "runs.db")
    History(Path(db))
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        pool.map(_writer, [(db, n) for n in range(3)])
    assert len(History(Path(db)).list(limit=100)) == 60


def test_runs_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STICKYCI_CACHE_DIR", str(tmp_path))
    History().record(_run(tmp_path))
    listed = CliRunner().invoke(runs, ["ls", "--json"])
    assert json.loads(listed.output)[0]["id"] == "20261129-000000-aaaaaa"
    shown = CliRunner().invoke(runs, ["show", "20261129"])
    assert shown.exit_code == 0 and "## Failures" in shown.output
