"""Run progress: a live table on a terminal, streamed lines otherwise (pipes, CI logs).

Job names, states, step names and step output are data, never markup: everything shown is
made printable (:func:`clean`) and handed to rich as ``Text``, so ``build[redis-server]`` is a
label and a step printing ``[bold]`` or an escape sequence changes nothing on the screen.
"""

from __future__ import annotations

import re
import time
from types import TracebackType
from typing import TextIO

import click
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ..runs import PENDING, QUEUED, RUNNING, JobRecord, RunRecord, StepRecord, printable

_STYLE = {"success": "green", "failure": "bold red", "timed_out": "bold red",
          "cancelled": "yellow", "skipped": "dim", RUNNING: "cyan", QUEUED: "blue",
          PENDING: "dim"}
# Escape sequences (colours, cursor moves) in step output: dropped, not shown escaped.
_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")
# A step that ended in one of these gets a line of its own.
_BAD = frozenset({"failure", "timed_out", "cancelled"})
# A line without a newline is printed once it is this long, so memory stays bounded.
MAX_LINE = 4096


def label(rec: JobRecord) -> str:
    """How a job instance is shown: ``build [redis-server]`` for a matrix instance."""
    rest = rec.id[len(rec.job):] if rec.id.startswith(rec.job) else ""
    return f"{rec.job} {rest}" if rest.startswith("[") else rec.id


def clean(line: str) -> str:
    """One line of step output, safe on a terminal: escape sequences dropped, what a carriage
    return overwrote dropped, tabs expanded, other control characters shown escaped."""
    line = _ESCAPE.sub("", line)
    if "\r" in line:  # a progress bar: what the terminal would show is the last part
        line = next((p for p in reversed(line.split("\r")) if p), "")
    return printable(line.expandtabs())


def step_elapsed(step: StepRecord, now: float) -> float:
    """How long a step has run (so far, if it is running)."""
    if step.state == RUNNING and step.started_at:
        return max(0.0, now - step.started_at)
    return step.seconds


class Lines:
    """Progress as lines on stderr, for pipes and CI logs.

    Each job's start and end; unless ``quiet``, also each step as it starts and every line
    of its output as the step writes it, prefixed with the job: ``build [api] | …``.
    """

    def __init__(self, start: float, *, quiet: bool = False, out: TextIO | None = None) -> None:
        self.start, self.quiet, self.out = start, quiet, out
        self.partial: dict[str, str] = {}  # per job: output after its last newline

    def _echo(self, text: str) -> None:
        click.echo(text, file=self.out, err=self.out is None)

    def _event(self, rec: JobRecord, text: str) -> None:
        self._echo(printable(f"[{time.time() - self.start:7.1f}s] {label(rec):40} {text}"))

    def job(self, rec: JobRecord, event: str) -> None:
        """A job started (``running``), ended (its state), or is retried (``retrying``)."""
        self._flush(rec)
        extra = f" ({rec.run_seconds:.1f}s)" if event not in (RUNNING, "retrying") else ""
        reason = f": {rec.reason}" if rec.reason and event != RUNNING else ""
        self._event(rec, f"{event}{extra}{reason}")

    def step(self, rec: JobRecord, step: StepRecord) -> None:
        """A step started or ended: a line when it starts, and when it ends badly."""
        if self.quiet:
            return
        self._flush(rec)
        if step.state == RUNNING:
            self._event(rec, f"step {step.name}")
        elif step.state in _BAD:
            code = f", exit {step.exit_code}" if step.exit_code is not None else ""
            self._event(rec, f"step {step.name}: {step.state}{code} "
                             f"({step.seconds:.1f}s)")

    def output(self, rec: JobRecord, text: str) -> None:
        """Output a step of ``rec`` wrote (already masked): printed line by line."""
        if self.quiet or not text:
            return
        *done, rest = (self.partial.pop(rec.id, "") + text).split("\n")
        while len(rest) > MAX_LINE:
            done.append(rest[:MAX_LINE])
            rest = rest[MAX_LINE:]
        for line in done:
            self._line(rec, line)
        if rest:
            self.partial[rec.id] = rest

    def _line(self, rec: JobRecord, line: str) -> None:
        self._echo(f"{printable(label(rec))} | {clean(line)}")

    def _flush(self, rec: JobRecord) -> None:
        rest = self.partial.pop(rec.id, "")
        if rest:
            self._line(rec, rest)


class LiveTable:
    """A table of every job (state, elapsed, the running step and its time), redrawn in
    place on stderr."""

    def __init__(self, run: RunRecord) -> None:
        self.run = run
        self.live = Live(console=Console(stderr=True), get_renderable=self.render,
                         refresh_per_second=4, transient=False)

    def render(self) -> Table:
        """The table as it is now."""
        table = Table(title=Text(printable(f"{self.run.pipeline} · run {self.run.id}")),
                      expand=False)
        for col in ("job", "state", "elapsed", "step"):
            table.add_column(col, justify="right" if col == "elapsed" else "left",
                             no_wrap=col != "step")
        now = time.time()
        for job in self.run.jobs:
            elapsed = (now - job.started_at if job.state == RUNNING
                       else job.run_seconds if job.started_at else 0.0)
            running = next((s for s in reversed(job.steps) if s.state == RUNNING), None)
            if running is not None:
                step = Text(printable(running.name[:60]))
                step.append(f" {step_elapsed(running, now):.1f}s", style="cyan")
            elif job.state == RUNNING:
                # Not in a step: mounting its disks first, or committing them last.
                over = all(s.state not in (PENDING, RUNNING) for s in job.steps)
                step = Text("" if not job.disks else "mounting disks" if not job.steps
                            else "committing disks" if over else "", style="dim")
            else:
                step = Text(printable(job.reason[:80]))
            name = Text(printable(job.job), style="bold")
            if (rest := label(job)[len(job.job):]) and job.id != job.job:
                name.append(printable(rest))
            table.add_row(name, Text(job.state, style=_STYLE.get(job.state, "")),
                          f"{elapsed:.1f}s" if job.started_at else "", step)
        return table

    def __enter__(self) -> LiveTable:
        self.live.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.live.__exit__(kind, exc, tb)
