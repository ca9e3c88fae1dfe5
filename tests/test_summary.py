"""Run summaries: failures first with their log tails, races named, reports written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stickyci.runs.history import record_from_dict
from stickyci.runs.record import DiskRecord, JobRecord, RunRecord, StepRecord
from stickyci.runs.summary import (
    duration,
    failing_step,
    render_markdown,
    write_reports,
)
from stickyci.units import format_size as size

T0 = 1_800_000_000.0


def _log(run_dir: Path, rel: str, text: str) -> str:
    path = run_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return rel


def make_run(run_dir: Path) -> RunRecord:
    """A warm run whose warm job failed, with a fan-out, a skip and a raced commit."""
    build_log = _log(run_dir, "logs/warm-deps/02-build-deps.log",
                     "".join(f"compiling lib{i}.c\n" for i in range(60))
                     + "lib59.c:3: error: 'x' undeclared\nmake: *** [all] Error 2\n")
    lint_log = _log(run_dir, "logs/warm-deps/01-lint.log", "lint: 3 warnings\n")
    stop_log = _log(run_dir, "logs/warm-deps/03-stop.log", "stopped compile server\n")
    warm = JobRecord(
        "warm-deps", "warm-deps", state="failure", reason="step 'build deps' exited 2",
        queued_at=T0, started_at=T0 + 0.5, finished_at=T0 + 95,
        steps=[StepRecord("lint", "failure", 1, 0.2, lint_log),  # continue_on_error
               StepRecord("build deps", "failure", 2, 93.0, build_log),
               StepRecord("stop", "success", 0, 0.1, stop_log, always=True)],
        disks=[DiskRecord("shop-deps", "/ws/deps", "overlay", 0.004, base_cached=True,
                          commit_reason="job failed")])
    api = JobRecord(
        "build[api]", "build", {"service": "api"}, ["warm-deps"], "skipped",
        "needs not successful: warm-deps")
    slow = JobRecord(
        "deploy[web]", "deploy", {"service": "web"}, [], "timed_out",
        "step 'push' timed out", queued_at=T0, started_at=T0 + 1, finished_at=T0 + 601,
        steps=[StepRecord("push", "timed_out", None, 600.0, "logs/deploy-web/01-push.log")])
    pack_a = JobRecord(
        "pack[a]", "pack", {"chain": "a"}, [], "success", queued_at=T0, started_at=T0 + 2,
        finished_at=T0 + 4,
        disks=[DiskRecord("shop-shared", "/ws/s", "reflink", 0.25, fresh=True, committed=True,
                          commit_reason="committed", commit_seconds=1.5,
                          stored_bytes=3 * 1024 * 1024, generation=7)])
    pack_b = JobRecord(
        "pack[b]", "pack", {"chain": "b"}, [], "success", queued_at=T0, started_at=T0 + 2,
        finished_at=T0 + 5,
        disks=[DiskRecord("shop-shared", "/ws/s", "copy", 0.5, committed=True,
                          commit_reason="committed | raced", commit_seconds=2.0,
                          stored_bytes=2048, generation=8,
                          raced_with=[{"gen": 7, "committer": "runner1:4242",
                                       "committed_at": T0 + 4}])])
    return RunRecord("20270115-093000-c0ffee", "shop", "ci/pipeline.yml",
                     "0123456789abcdef0123456789abcdef01234567", False, "failure", T0,
                     T0 + 612, str(run_dir), [api, pack_a, pack_b, warm, slow])


def test_headline_names_state_pipeline_sha_kind_and_wall_time(tmp_path: Path) -> None:
    text = render_markdown(make_run(tmp_path))
    headline = text[:text.index("## Failures")]
    assert headline.startswith("# shop: FAILURE\n")
    assert "`0123456789ab`" in headline and "0123456789abc" not in headline
    assert "warm" in headline and "10m12s wall" in headline
    assert "`warm-deps`" in headline and "`deploy[web]`" in headline


def test_failures_come_first_with_the_failing_steps_log_tail(tmp_path: Path) -> None:
    text = render_markdown(make_run(tmp_path))
    failures, jobs = text.index("## Failures"), text.index("## Jobs")
    assert failures < jobs
    section = text[failures:jobs]
    assert section.index("### warm-deps: failure") < section.index("### deploy[web]: timed_out")
    assert "step 'build deps' exited 2" in section
    # The step the reason names, not the continue_on_error step that failed before it.
    assert "Failing step: `build deps` (failure, exit 2, 1m33s)" in section
    assert "make: *** [all] Error 2" in section and "lib59.c:3: error" in section
    assert "compiling lib42.c" in section and "compiling lib41.c" not in section  # 20 lines
    assert "Also not successful: `lint`" in section
    assert "build[api]" not in section  # a skipped job is not a failure
    # The timed-out step never wrote a log: still named, and said so.
    assert "Failing step: `push` (timed_out, 10m00s)" in section
    assert "No log to show (logs/deploy-web/01-push.log)" in section


def test_failing_step_when_no_reason_names_one() -> None:
    job = JobRecord("j", "j", state="failure", reason="disk shop-deps: mount failed",
                    steps=[], disks=[DiskRecord("shop-deps", "/d", error="mount failed")])
    assert failing_step(job) is None
    teardown = StepRecord("stop", "failure", 1, always=True)
    main = StepRecord("make", "failure", 2)
    job = JobRecord("j", "j", state="failure", steps=[teardown, main])
    assert failing_step(job) is main  # a teardown failure is not the cause


def test_job_failed_by_its_disk_shows_the_disk_error(tmp_path: Path) -> None:
    job = JobRecord("warm", "warm", state="failure", reason="commit of disk d failed: busy",
                    started_at=T0, finished_at=T0 + 1,
                    disks=[DiskRecord("d", "/ws/d", "overlay", error="busy: pid 7 (make)")])
    run = RunRecord("r1", "p", "p.yml", "abc", True, "failure", T0, T0 + 1, str(tmp_path),
                    [job])
    text = render_markdown(run)
    section = text[text.index("## Failures"):text.index("## Jobs")]
    assert "commit of disk d failed: busy" in section and "- disk d: busy: pid 7 (make)" in section
    assert "cold" in text[:text.index("## Failures")]


def test_log_tail_cannot_break_out_of_its_code_block(tmp_path: Path) -> None:
    log = _log(tmp_path, "logs/j/01-x.log", "before\n```\n# not a heading\n\x1b[31mred\x1b[0m\n")
    job = JobRecord("j", "j", state="failure", reason="step 'x' exited 1",
                    steps=[StepRecord("x", "failure", 1, 0.1, log)])
    run = RunRecord("r", "p", "p.yml", "abc", False, "failure", T0, T0, str(tmp_path), [job])
    text = render_markdown(run)
    assert "````\nbefore\n```\n# not a heading\nred\n````" in text


def test_race_warning_names_both_commits(tmp_path: Path) -> None:
    text = render_markdown(make_run(tmp_path))
    races = text[text.index("## Races"):text.index("## Jobs")]
    assert "Warning" in races
    assert "disk shop-shared: job pack[b] committed generation 8" in races
    assert "generation 7 by runner1:4242 (job pack[a] of this run)" in races
    assert "last write wins; give each committing chain its own disk" in races


def test_job_table_and_disk_section(tmp_path: Path) -> None:
    text = render_markdown(make_run(tmp_path))
    jobs, disks = text.index("## Jobs"), text.index("## Disks")
    table = text[jobs:disks]
    assert "| job | state | queued | ran | steps | mount | commit | stored | cache |" in table
    assert "| build[api] | skip | - | - | - | - | - | - | - |" in table
    assert "| pack[a] | ok | 2.0s | 2.0s | - | 250ms | 1.5s | 3.0 MiB | empty |" in table
    assert "| warm-deps | FAIL | 500ms | 1m34s | 1m33s | 4ms | - | 0 B | cached |" in table
    # Every column is explained under the table, the time that is not step time included.
    for word in ("`ran`", "`mount`", "`steps`", "`commit`", "`stored`", "`empty`", "`cached`",
                 "`restored`"):
        assert word in table, word
    assert "| deploy[web] | TIMEOUT |" in table
    section = text[disks:]
    assert "| pack[a] | shop-shared | reflink | 250ms | yes | committed | 3.0 MiB | 7 |" in section
    # A pipe in a reason must not split the cell.
    assert "| pack[b] | shop-shared | copy | 500ms | yes, raced | committed \\| raced |" in section
    assert "| warm-deps | shop-deps | overlay | 4ms | no | job failed | 0 B | - |" in section


def test_a_successful_run_has_no_failure_or_race_section(tmp_path: Path) -> None:
    job = JobRecord("a", "a", state="success", started_at=T0, finished_at=T0 + 1)
    run = RunRecord("r", "p", "p.yml", "abc", False, "success", T0, T0 + 1, str(tmp_path), [job])
    text = render_markdown(run)
    assert text.startswith("# p: SUCCESS")
    assert "## Failures" not in text and "## Races" not in text and "## Disks" not in text
    assert "| a | ok |" in text


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (0.0004, "1ms"), (0.035, "35ms"), (4.24, "4.2s"), (59.9, "59.9s"),
    (125, "2m05s"), (3599.6, "1h00m"), (3720, "1h02m")])
def test_duration(seconds: float, text: str) -> None:
    assert duration(seconds) == text


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536 * 1024, "1.5 MiB"),
    (5 * 1024**3, "5.0 GiB"), (3 * 1024**4, "3.0 TiB")])
def test_size(n: int, text: str) -> None:
    assert size(n) == text


def test_write_reports_round_trips_and_appends_to_the_step_summary(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    step_summary = tmp_path / "github-step-summary.md"
    step_summary.write_text("## Lint\nall clean")  # an earlier step, no final newline
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step_summary))
    run = make_run(tmp_path / "run")
    md, js = write_reports(run)
    assert (md, js) == (tmp_path / "run" / "summary.md", tmp_path / "run" / "summary.json")
    assert md.read_text() == render_markdown(run)
    doc = json.loads(js.read_text())
    assert doc == run.to_dict()
    assert record_from_dict(doc) == run
    assert step_summary.read_text() == "## Lint\nall clean\n" + md.read_text()
    write_reports(run)  # a second report appends again, never overwrites
    assert step_summary.read_text() == "## Lint\nall clean\n" + 2 * md.read_text()
    assert sorted(p.name for p in md.parent.iterdir()) == ["logs", "summary.json", "summary.md"]


def test_write_reports_without_github(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    md, js = write_reports(make_run(tmp_path))
    assert md.exists() and js.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs", "summary.json", "summary.md"]


def test_an_empty_disk_is_empty_even_when_its_nothing_is_cached(tmp_path: Path) -> None:
    # Before: a cold run's disks showed "cached" (an empty base is always "on this machine"),
    # and a first run on an empty store was headlined "warm".
    run = make_run(tmp_path)
    for job in run.jobs:
        for d in job.disks:
            d.fresh, d.base_cached = True, True
    assert run.kind == "empty"
    text = render_markdown(run)
    assert "warm" not in text[:text.index("## Failures")].replace("warm-deps", "")
    assert "on empty disks" in text
    assert "| warm-deps | FAIL | 500ms | 1m34s | 1m33s | 4ms | - | 0 B | empty |" in text
    run.cold = True
    assert run.kind == "cold" and "cold (every disk started empty" in render_markdown(run)
