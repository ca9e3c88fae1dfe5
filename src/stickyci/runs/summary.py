"""Run reports: ``summary.md`` (failures first, then races, jobs and disks) and ``summary.json``."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

from ..errors import UsageError
from ..units import format_size
from .record import (
    CANCELLED,
    FAILURE,
    SKIPPED,
    SUCCESS,
    TIMED_OUT,
    DiskRecord,
    JobRecord,
    RunRecord,
    StepRecord,
)

# A job in one of these states did not do its work; it is listed before anything else.
NOT_SUCCESSFUL = (FAILURE, TIMED_OUT, CANCELLED)
MARKS = {SUCCESS: "ok", FAILURE: "FAIL", TIMED_OUT: "TIMEOUT", CANCELLED: "CANCEL",
         SKIPPED: "skip"}
JOB_COLUMNS = ("job", "state", "queued", "ran", "steps", "mount", "commit", "stored", "cache")
# What the job table's columns mean, under the table in summary.md.
_JOB_LEGEND = (
    "`ran` is the job from start to end: mounting its disks (`mount`), its `steps`, "
    "committing its disks (`commit`, when one was committed; discarding one is not shown) "
    "and the runner's own work between them. `stored`: new bytes its commits wrote to the "
    "store. `cache`, per disk, how it started: `empty` (no snapshot under its key yet, or a "
    "cold run), `cached` (its snapshot was already on this machine: nothing fetched), "
    "`restored` (its snapshot was fetched from the store and laid out here).")
TAIL_LINES = 20
# Read at most this much of a log's end: a runaway step can write gigabytes.
_TAIL_BYTES = 64 * 1024
_MAX_LINE = 1000
# Colour codes render as junk in Markdown (GitHub's job page included).
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
# Control characters (escape sequences start with one) and bidirectional overrides: a job id
# from a services config or an error message must not move the cursor or reorder the line.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` safe to print on a terminal: unprintable characters shown escaped."""
    return _UNPRINTABLE.sub(lambda m: ascii(m.group())[1:-1], text)


def duration(seconds: float) -> str:
    """``0s``, ``35ms``, ``4.2s``, ``2m05s``, ``1h02m``."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def failures(run: RunRecord) -> list[JobRecord]:
    """The jobs that failed, timed out or were cancelled, in run order."""
    return [j for j in run.jobs if j.state in NOT_SUCCESSFUL]


def failing_step(job: JobRecord) -> StepRecord | None:
    """The step that made ``job`` fail, or None when it failed elsewhere (a disk, a template).

    A ``continue_on_error`` step can fail before the one that counted, and teardown steps can
    fail after it; the executor names the one that counted in the job's reason, so that wins.
    """
    bad = [s for s in job.steps if s.state in NOT_SUCCESSFUL]
    for step in bad:
        if job.reason.startswith(f"step {step.name!r} "):
            return step
    if job.state == CANCELLED:
        # Steps the cancellation skipped have no log; the one it interrupted has.
        ran = [s for s in bad if s.log]
        return ran[0] if ran else None
    return next((s for s in bad if not s.always), bad[0] if bad else None)


def log_tail(run: RunRecord, step: StepRecord, lines: int = TAIL_LINES) -> list[str] | None:
    """The last ``lines`` lines of a step's log, or None when there is no log to read."""
    if not step.log or not run.run_dir:
        return None
    try:
        # The run directory is within reach of the steps: what is at a log's path may be a
        # symlink to /dev/zero or a FIFO by now. Only a plain file is read, and only its end.
        fd = os.open(Path(run.run_dir) / step.log,
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            start = max(0, f.seek(0, os.SEEK_END) - _TAIL_BYTES)
            f.seek(start)
            data = f.read(_TAIL_BYTES)
    except OSError:
        return None
    all_lines = _ANSI.sub("", data.decode(errors="replace")).splitlines()
    if start and len(all_lines) > 1:
        all_lines = all_lines[1:]  # we began reading mid-line
    tail = all_lines[-lines:]
    return [line if len(line) <= _MAX_LINE else line[:_MAX_LINE] + " …" for line in tail]


def _base(d: DiskRecord) -> str:
    # An empty disk has nothing to cache: "cached" would claim a warm start it did not have.
    return "empty" if d.fresh else "cached" if d.base_cached else "restored"


def job_rows(run: RunRecord) -> list[list[str]]:
    """One row per job, in ``JOB_COLUMNS`` order, for the Markdown and the terminal tables."""
    rows = []
    for job in run.jobs:
        started = bool(job.started_at)
        mount = sum(d.mount_seconds for d in job.disks)
        commit = sum(d.commit_seconds for d in job.disks)
        stored = sum(d.stored_bytes for d in job.disks)
        rows.append([
            job.id,
            MARKS.get(job.state, job.state),
            duration(job.queue_seconds) if started else "-",
            duration(job.run_seconds) if started else "-",
            duration(sum(s.seconds for s in job.steps)) if job.steps else "-",
            duration(mount) if job.disks else "-",
            duration(commit) if any(d.committed for d in job.disks) else "-",
            format_size(stored) if job.disks else "-",
            ", ".join(_base(d) for d in job.disks) or "-",
        ])
    return rows


def race_warnings(run: RunRecord) -> list[str]:
    """One line per commit that raced another commit of the same disk, naming both."""
    # The other committer is a host:pid; when it was a job of this very run, say which.
    by_gen = {(d.key, d.generation): j.id for j in run.jobs for d in j.disks if d.committed}
    out = []
    for job in run.jobs:
        for d in job.disks:
            if not d.raced_with:
                continue
            others = []
            for g in d.raced_with:
                gen = g.get("gen", "?")
                here = by_gen.get((d.key, gen)) if isinstance(gen, int) else None
                where = f" (job {here} of this run)" if here and here != job.id else ""
                others.append(f"generation {gen} by {g.get('committer', 'unknown')}{where}")
            out.append(f"disk {d.key}: job {job.id} committed generation {d.generation}, "
                       f"racing with {' and '.join(others)}; last write wins; give each "
                       "committing chain its own disk")
    return out


def _kind(run: RunRecord) -> str:
    return {"cold": "cold (every disk started empty, on purpose)",
            "empty": "on empty disks (nothing committed under their keys yet)",
            "warm": "warm", "no disks": "no disks"}.get(run.kind, run.kind)


def _cell(text: str) -> str:
    # A pipe or a newline inside a cell would end the cell or the table.
    return " ".join(text.split()).replace("|", "\\|") or "-"


def _table(headers: tuple[str, ...] | list[str], rows: list[list[str]],
           right: frozenset[int]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |",
           "|" + "|".join("---:" if i in right else "---" for i in range(len(headers))) + "|"]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out


def _fence(lines: list[str]) -> list[str]:
    # CommonMark: a code fence ends only at a run of backticks at least as long as the opening.
    longest = max((len(m) for line in lines for m in re.findall(r"`+", line)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence, *lines, fence]


def _failure_section(run: RunRecord, job: JobRecord) -> list[str]:
    out = [f"### {job.id}: {job.state}", "", _cell(job.reason or "no reason recorded")]
    step = failing_step(job)
    if step is not None:
        exit_code = f"exit {step.exit_code}, " if step.exit_code is not None else ""
        out += ["", f"Failing step: `{step.name}` ({step.state}, {exit_code}"
                    f"{duration(step.seconds)})"]
        tail = log_tail(run, step)
        if tail:
            out += ["", f"Last {len(tail)} lines of `{step.log}`:", "", *_fence(tail)]
        else:
            out += ["", f"No log to show ({step.log or 'the step did not start'})."]
    later = [s.name for s in job.steps if s.state in NOT_SUCCESSFUL and s is not step and s.log]
    if later:
        out += ["", "Also not successful: " + ", ".join(f"`{n}`" for n in later)]
    out += [f"- disk {d.key}: {_cell(d.error)}" for d in job.disks if d.error]
    return [*out, ""]


def _attempts_section(run: RunRecord) -> list[str]:
    """Which worker ran each attempt of each job: on a cluster, or when a job was retried."""
    if run.executor == "local" and all(len(j.attempts) < 2 for j in run.jobs):
        return []
    rows = []
    for job in run.jobs:
        for a in job.attempts:
            worker = f"{a.worker} ({a.worker_name})" if a.worker_name else a.worker
            ran = duration(a.finished_at - a.started_at) if a.finished_at else "-"
            rows.append([job.id, str(a.attempt), worker, MARKS.get(a.state, a.state), ran,
                         a.reason])
    return ["## Attempts", "",
            *_table(("job", "attempt", "worker", "state", "ran", "note"), rows,
                    frozenset({1, 4})), ""]


def render_markdown(run: RunRecord) -> str:
    """The run as Markdown: headline, failures with log tails, races, jobs, disks."""
    failed = failures(run)
    counts: dict[str, int] = {}
    for job in run.jobs:
        mark = MARKS.get(job.state, job.state)
        counts[mark] = counts.get(mark, 0) + 1
    tally = ", ".join(f"{n} {mark}" for mark, n in counts.items())
    out = [f"# {run.pipeline}: {run.state.upper()}", "",
           f"Run `{run.id}` of `{run.sha[:12]}`, {_kind(run)}, "
           f"{duration(run.seconds)} wall; {len(run.jobs)} jobs ({tally or 'none'})"
           + (f" on the Dask cluster at `{run.scheduler}`." if run.scheduler else "."), ""]
    if failed:
        names = ", ".join(f"`{j.id}`" for j in failed)
        out += [f"**{len(failed)} job(s) did not succeed: {names}.**", "", "## Failures", ""]
        for job in failed:
            out += _failure_section(run, job)
    races = race_warnings(run)
    if races:
        out += ["## Races", "", "> **Warning: two chains committed the same disk.**", ">"]
        out += [f"> - {_cell(line)}" for line in races]
        out.append("")
    out += ["## Jobs", "", *_table(JOB_COLUMNS, job_rows(run), frozenset({2, 3, 4, 5, 6, 7})),
            "", _JOB_LEGEND, ""]
    out += _attempts_section(run)
    disks = [(j, d) for j in run.jobs for d in j.disks]
    if disks:
        rows = []
        for job, d in disks:
            committed = ("yes, raced" if d.raced_with else "yes") if d.committed else "no"
            reason = f"error: {d.error}" if d.error else d.commit_reason
            rows.append([job.id, d.key, d.strategy or "-", duration(d.mount_seconds), committed,
                         reason, format_size(d.stored_bytes), str(d.generation or "-")])
        headers = ("job", "disk", "strategy", "mount", "committed", "reason", "stored", "gen")
        out += ["## Disks", "", *_table(headers, rows, frozenset({3, 6, 7})), ""]
    return "\n".join(out)


def _write(path: Path, text: str) -> None:
    # Written aside then renamed, so a reader never sees half a report.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_reports(run: RunRecord) -> tuple[Path, Path]:
    """Write ``summary.md`` and ``summary.json`` in the run directory; return their paths.

    The Markdown is also appended to ``$GITHUB_STEP_SUMMARY`` when that is set, so the run
    shows on a GitHub Actions job page next to whatever earlier steps wrote there.
    """
    if not run.run_dir:
        raise UsageError(f"run {run.id} has no run directory to write its reports in")
    root = Path(run.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    md, js = root / "summary.md", root / "summary.json"
    text = render_markdown(run)
    _write(md, text)
    _write(js, json.dumps(run.to_dict(), indent=2) + "\n")
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if step_summary:
        with open(step_summary, "ab+") as f:
            # Start on a fresh line, or our headline would glue onto the last one there.
            end = f.seek(0, os.SEEK_END)
            if end:
                f.seek(end - 1)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write(text.encode())
    return md, js
