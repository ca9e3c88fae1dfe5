"""``stickyci runs ls``, ``show RUN`` and ``push [RUN…]``: the run history on this machine."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import click

from ..errors import UsageError
from ..runs import (
    JOB_COLUMNS,
    History,
    RunRecord,
    duration,
    failing_step,
    failures,
    job_rows,
    printable,
    push_runs,
    race_warnings,
)

# Columns of numbers read best right-aligned.
_RIGHT = frozenset({2, 3, 4, 5, 6, 7})
_LEGEND = ("RAN = MOUNT + STEPS + COMMIT + the runner's own work; CACHE, per disk: empty (no "
           "snapshot yet, or cold), cached (already on this machine), restored (fetched from "
           "the store)")


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _columns(headers: list[str], rows: list[list[str]], right: frozenset[int]) -> list[str]:
    """An aligned plain-text table."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    return ["  ".join(c.rjust(w) if i in right else c.ljust(w)
                      for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()
            for row in [headers, *rows]]


def render_text(run: RunRecord) -> str:
    """A run for the terminal: headline, failures and races first, then the job table."""
    out = [f"run {run.id}: {run.pipeline} {run.state.upper()}, "
           f"{run.kind}, sha {run.sha[:12]}, {duration(run.seconds)} wall",
           f"started {_when(run.started_at)}; summary: {Path(run.run_dir) / 'summary.md'}", ""]
    for job in failures(run):
        out.append(f"{job.state.upper()} {job.id}: {job.reason or 'no reason recorded'}")
        step = failing_step(job)
        if step is not None and step.log:
            out.append(f"  step {step.name!r}, log {Path(run.run_dir) / step.log}")
    out += [f"WARNING {line}" for line in race_warnings(run)]
    if out[-1]:
        out.append("")
    out += _columns([c.upper() for c in JOB_COLUMNS], job_rows(run), _RIGHT)
    out += ["", _LEGEND]
    return "\n".join(map(printable, out))


@click.group()
def runs() -> None:
    """Pipeline runs recorded on this machine."""


@runs.command("ls")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True,
              help="How many runs to list.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def ls(limit: int, as_json: bool) -> None:
    """List recent runs, newest first."""
    rows = History().list(limit)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no runs")
        return
    table: list[list[str]] = [
        [r["id"], r["pipeline"], r["state"], r["kind"], r["sha"][:12],
         str(r["jobs"]), str(r["failed"]), duration(r["seconds"]), _when(r["started_at"])]
        for r in rows]
    headers = ["RUN", "PIPELINE", "STATE", "KIND", "SHA", "JOBS", "FAILED", "TIME", "STARTED"]
    click.echo("\n".join(map(printable, _columns(headers, table, frozenset({5, 6, 7})))))


@runs.command()
@click.argument("run_id", metavar="RUN")
@click.option("--json", "as_json", is_flag=True, help="Print the run record as JSON.")
def show(run_id: str, as_json: bool) -> None:
    """Show a run (its id, the start of it, or `latest`): failures first, then every job."""
    record = History().get(run_id)
    doc: dict[str, Any] = record.to_dict()
    click.echo(json.dumps(doc, indent=2) if as_json else render_text(record))


@runs.command()
@click.argument("run_ids", nargs=-1, metavar="[RUN]...")
@click.option("--server", "server_url", envvar="STICKYCI_STORE", metavar="URL",
              help="The stickyci server, http://HOST:PORT (default: STICKYCI_STORE); the "
                   "token is STICKYCI_TOKEN's.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True,
              help="Without RUN: how many of the newest runs to push.")
def push(run_ids: tuple[str, ...], server_url: str | None, limit: int) -> None:
    """Send runs recorded here to a stickyci server's dashboard: each RUN (its id, the start
    of it, or `latest`), else the newest --limit runs, oldest first."""
    if not server_url:
        raise UsageError("push needs the server: --server http://HOST:PORT (or set "
                         "STICKYCI_STORE to it)")
    history = History()
    ids = list(run_ids) or [r["id"] for r in reversed(history.list(limit))]
    push_runs([history.get(i) for i in ids], server_url, say=click.echo)
