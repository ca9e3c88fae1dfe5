"""``stickyci logs RUN [JOB] [-f]``: a run's step logs, or following them as they are written.

The logs are the files the run writes under its directory (``logs/<job>/NN-<step>.log``, a
Dask retry's in ``logs/<job>.attempt-N/``), so a run is followed from any terminal on the
machine that runs it, while it runs. What a step wrote is data: it is printed as
:func:`~.progress.clean` makes it, and the files are opened without following a symlink a
step may have put in their place.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from ..errors import NotFound
from ..pipeline.job import safe
from ..runs import CANCELLED, FAILURE, RUNNING, SUCCESS, History, JobRecord, RunRecord
from .progress import MAX_LINE, clean, label

# How often a followed run's logs are looked at.
POLL = 0.2
READ_CHUNK = 64 * 1024
EXIT_CODES = {SUCCESS: 0, FAILURE: 1, CANCELLED: 130}


@dataclass(slots=True)
class _Log:
    """One log file being read: where we are in it, and the line not ended yet."""

    fd: int
    offset: int = 0
    partial: str = ""


@dataclass(slots=True)
class Follower:
    """Prints the new lines of the logs of some jobs of a run, each time it is polled."""

    run: RunRecord
    jobs: list[JobRecord]
    prefix: bool  # prefix every line with its job (more than one job is shown)
    logs: dict[Path, _Log] = field(default_factory=dict)

    def poll(self, *, final: bool = False) -> None:
        """Print what every log gained since the last poll (and, if ``final``, the lines
        not ended by a newline)."""
        for job in self.jobs:
            for path in self._files(job):
                log = self.logs.get(path)
                if log is None:
                    fd = _open(path)
                    if fd is None:
                        continue
                    log = self.logs[path] = _Log(fd)
                    rel = path.relative_to(Path(self.run.run_dir) / "logs")
                    self._echo(job, f"==> {rel} <==")
                self._read(job, log, final)

    def close(self) -> None:
        """Close every log."""
        for log in self.logs.values():
            os.close(log.fd)
        self.logs.clear()

    def _files(self, job: JobRecord) -> list[Path]:
        root = Path(self.run.run_dir) / "logs"
        name = safe(job.id)
        dirs = []
        with contextlib.suppress(OSError):
            dirs = sorted(d for d in os.listdir(root)
                          if d == name or d.startswith(f"{name}.attempt-"))
        files = []
        for d in dirs:
            where = root / d
            if not stat.S_ISDIR(os.lstat(where).st_mode):
                continue  # a symlink a step planted: not a log directory of ours
            with contextlib.suppress(OSError):
                files += sorted(where / f for f in os.listdir(where) if f.endswith(".log"))
        return files

    def _read(self, job: JobRecord, log: _Log, final: bool) -> None:
        while data := os.pread(log.fd, READ_CHUNK, log.offset):
            log.offset += len(data)
            *done, log.partial = (log.partial + data.decode(errors="replace")).split("\n")
            for line in done:
                self._echo(job, clean(line))
            while len(log.partial) > MAX_LINE:
                self._echo(job, clean(log.partial[:MAX_LINE]))
                log.partial = log.partial[MAX_LINE:]
        if final and log.partial:
            self._echo(job, clean(log.partial))
            log.partial = ""

    def _echo(self, job: JobRecord, text: str) -> None:
        click.echo(f"{clean(label(job))} | {text}" if self.prefix else text)


def _open(path: Path) -> int | None:
    """A plain file's descriptor, or None (gone, a FIFO, a symlink)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def select(run: RunRecord, job: str | None) -> list[JobRecord]:
    """The jobs of ``run`` that ``job`` names: an instance (``build[api]`` or ``build [api]``),
    every instance of a job (``build``), or every job (None)."""
    if job is None:
        return list(run.jobs)
    wanted = job.replace(" [", "[", 1)
    found = [j for j in run.jobs if j.id == wanted] or [j for j in run.jobs if j.job == job]
    if not found:
        names = ", ".join(dict.fromkeys(j.job for j in run.jobs))
        raise NotFound(f"run {run.id} has no job {job!r}; its jobs: {names}")
    return found


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True  # recorded before runs had a pid: rely on its state alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@click.command()
@click.argument("run_id", metavar="RUN")
@click.argument("job", required=False)
@click.option("-f", "--follow", is_flag=True,
              help="Keep printing as the steps write, until the run ends; exit as `stickyci "
                   "run` would.")
def logs(run_id: str, job: str | None, follow: bool) -> None:
    """Print the step logs of RUN (its id, the start of it, or `latest`), of every job or of
    JOB (a job, or one instance of a matrix job: 'build[api]')."""
    history = History()
    run = history.get(run_id)
    jobs = select(run, job)
    follower = Follower(run, jobs, prefix=len(jobs) > 1)
    try:
        while True:
            running = follow and run.state == RUNNING and _alive(run.pid)
            follower.poll(final=not running)
            if not running:
                break
            time.sleep(POLL)  # polling files another process writes
            run = history.get(run.id)
    finally:
        follower.close()
    if follow:
        if run.state == RUNNING:
            click.echo(f"stickyci: the process of run {run.id} (pid {run.pid}) is gone; the "
                       "run did not finish", err=True)
            sys.exit(1)
        sys.exit(EXIT_CODES.get(run.state, 1))
