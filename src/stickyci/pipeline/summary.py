"""Run reports: ``summary.md`` (failures first) and ``summary.json``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .record import CANCELLED, FAILURE, SKIPPED, SUCCESS, TIMED_OUT, JobRecord, RunRecord

_MARK = {SUCCESS: "ok", FAILURE: "FAIL", TIMED_OUT: "TIMEOUT", CANCELLED: "cancelled",
         SKIPPED: "skip"}
_TAIL = 20


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _secs(s: float) -> str:
    return f"{s:.1f}s" if s < 120 else f"{int(s // 60)}m{int(s % 60):02d}s"


def _tail(run: RunRecord, job: JobRecord) -> tuple[str, str]:
    """The name and last lines of the step that failed."""
    for step in job.steps:
        if step.state in (FAILURE, TIMED_OUT) and step.log:
            try:
                lines = (Path(run.run_dir) / step.log).read_text(errors="replace").splitlines()
            except OSError:
                lines = []
            return step.name, "\n".join(lines[-_TAIL:])
    return "", ""


def render_markdown(run: RunRecord) -> str:
    """The run as Markdown: headline, failures (with log tails), jobs, disks, races."""
    failed = [j for j in run.jobs if j.state in (FAILURE, TIMED_OUT, CANCELLED)]
    kind = "cold" if run.cold else "warm"
    out = [f"# {run.pipeline}: {run.state.upper()}",
           "",
           f"Run `{run.id}` at `{run.sha[:12]}` ({kind}), {_secs(run.seconds)} wall, "
           f"{len(run.jobs)} jobs, {len(failed)} not successful.", ""]
    if failed:
        out += ["## Failures", ""]
        for job in failed:
            out.append(f"### {job.id}: {job.state}")
            out.append(f"{job.reason or 'no reason recorded'}")
            step, tail = _tail(run, job)
            if tail:
                out += ["", f"Last lines of step `{step}`:", "", "```", tail, "```"]
            out.append("")
    races = [(j, d) for j in run.jobs for d in j.disks if d.raced_with]
    if races:
        out += ["## Races", ""]
        for job, disk in races:
            others = ", ".join(f"generation {g['gen']} by {g['committer']}"
                               for g in disk.raced_with)
            out.append(f"- **{disk.key}**: {job.id} committed generation {disk.generation} "
                       f"over {others}; last write wins. Give each committing chain its own "
                       "disk.")
        out.append("")
    out += ["## Jobs", "", "| job | state | queued | ran | mount | commit | stored | base |",
            "|---|---|---:|---:|---:|---:|---:|---|"]
    for job in run.jobs:
        mount = sum(d.mount_seconds for d in job.disks)
        commit = sum(d.commit_seconds for d in job.disks)
        stored = sum(d.stored_bytes for d in job.disks)
        bases = ", ".join("cached" if d.base_cached else "fresh" if d.fresh else "restored"
                          for d in job.disks) or "-"
        out.append(f"| {job.id} | {_MARK.get(job.state, job.state)} | "
                   f"{_secs(job.queue_seconds)} | {_secs(job.run_seconds)} | {mount:.2f}s | "
                   f"{commit:.2f}s | {_size(stored)} | {bases} |")
    disks = [(j, d) for j in run.jobs for d in j.disks]
    if disks:
        out += ["", "## Disks", "", "| job | disk | strategy | mount | commit | stored | gen |",
                "|---|---|---|---:|---|---:|---:|"]
        for job, d in disks:
            outcome = (f"yes, {d.commit_seconds:.2f}s" if d.committed
                       else d.error or d.commit_reason or "no")
            out.append(f"| {job.id} | {d.key} | {d.strategy or '-'} | {d.mount_seconds:.3f}s | "
                       f"{outcome} | {_size(d.stored_bytes)} | {d.generation or '-'} |")
    return "\n".join(out) + "\n"


def write_reports(run: RunRecord) -> tuple[Path, Path]:
    """Write ``summary.md`` and ``summary.json`` in the run directory.

    The Markdown is also appended to ``$GITHUB_STEP_SUMMARY`` when that is set, so the run
    shows on a GitHub Actions job page.
    """
    root = Path(run.run_dir)
    md, js = root / "summary.md", root / "summary.json"
    text = render_markdown(run)
    md.write_text(text)
    js.write_text(json.dumps(run.to_dict(), indent=2))
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if step_summary:
        with open(step_summary, "a") as f:
            f.write(text)
    return md, js
