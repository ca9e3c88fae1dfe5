"""Run progress: a live table on a terminal, plain lines otherwise."""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType

import click
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ..runs import RUNNING, JobRecord, RunRecord, printable

_STYLE = {"success": "green", "failure": "bold red", "timed_out": "bold red",
          "cancelled": "yellow", "skipped": "dim", "running": "cyan", "queued": "blue"}


def lines(start: float) -> Callable[[JobRecord, str], None]:
    """One line per job event, for logs and pipes."""
    def report(rec: JobRecord, event: str) -> None:
        extra = f" ({rec.run_seconds:.1f}s)" if event != RUNNING else ""
        reason = f": {rec.reason}" if rec.reason and event != RUNNING else ""
        click.echo(printable(f"[{time.time() - start:7.1f}s] {rec.id:40} {event}{extra}"
                             f"{reason}"), err=True)
    return report


class LiveTable:
    """A table of every job (state, elapsed, current step), redrawn in place on stderr."""

    def __init__(self, run: RunRecord) -> None:
        self.run = run
        self.live = Live(console=Console(stderr=True), get_renderable=self.render,
                         refresh_per_second=4, transient=False)

    def render(self) -> Table:
        """The table as it is now."""
        table = Table(title=f"{self.run.pipeline} · run {self.run.id}", expand=False)
        for col in ("job", "state", "elapsed", "step"):
            table.add_column(col, justify="right" if col == "elapsed" else "left")
        now = time.time()
        for job in self.run.jobs:
            elapsed = (now - job.started_at if job.state == RUNNING
                       else job.run_seconds if job.started_at else 0.0)
            step = next((s.name for s in reversed(job.steps) if s.state == RUNNING),
                        job.reason if job.state != RUNNING else "")
            # Text, not markup: a job id or a reason with [brackets] is data.
            table.add_row(Text(printable(job.id)),
                          Text(job.state, style=_STYLE.get(job.state, "")),
                          f"{elapsed:.1f}s" if job.started_at else "",
                          Text(printable(step[:60])))
        return table

    def __enter__(self) -> LiveTable:
        self.live.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.live.__exit__(kind, exc, tb)
