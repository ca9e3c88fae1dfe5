"""``stickyci run PIPELINE.yml``: plan, execute (locally or on Dask), report, record."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import click

from ..errors import UsageError
from ..paths import cache_home
from ..pipeline import diskclient
from ..pipeline import plan as plan_
from ..pipeline import spec as spec_
from ..pipeline.executors.base import Executor, Fanout, Options, Progress
from ..pipeline.executors.local import LocalExecutor
from ..pipeline.job import describe_fault, safe
from ..pipeline.masking import Masker, run_masker
from ..pipeline.plan import Plan
from ..runs import (
    CANCELLED,
    FAILURE,
    FINISHED,
    SUCCESS,
    History,
    JobRecord,
    Reporter,
    RunRecord,
    chart,
    compare,
    printable,
    runs_url,
    table,
    write_reports,
)
from ..store import default_store_url, open_backend
from ..units import option_duration
from .progress import Lines, LiveTable

EXIT_CODES = {SUCCESS: 0, FAILURE: 1, CANCELLED: 130}


def git_sha(where: Path) -> str:
    """``git rev-parse HEAD`` in ``where``, or ``local`` outside a repository."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "local"
    return out.stdout.strip() if out.returncode == 0 else "local"


def _use_store(url: str | None) -> None:
    # Jobs reach the store through `stickyci disk` subprocesses, which read the environment.
    if url:
        open_backend(url)  # a bad URL is an error now, not in every job
        os.environ["STICKYCI_STORE"] = url


def parse_sets(pairs: tuple[str, ...]) -> dict[str, str]:
    """``NAME=VALUE`` pairs from ``--set``."""
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"--set {pair!r}: use NAME=VALUE")
        out[name] = value
    return out


class Cluster(NamedTuple):
    """The Dask scheduler a run goes to, and how long to wait for it and a first worker."""

    address: str
    timeout: float


def _cluster(spec: spec_.PipelineSpec, executor: str | None, scheduler: str | None,
             connect_timeout: float | None) -> Cluster | None:
    """The Dask cluster to run on, or None to run locally; arguments win over the file."""
    if (executor or spec.executor) == "local":
        for given, option in ((scheduler, "--scheduler"), (connect_timeout, "--connect-timeout")):
            if given is not None:
                raise UsageError(f"{option} is for the Dask executor: add --executor dask (or "
                                 "executor: dask in the pipeline file)")
        return None
    address = scheduler or spec.scheduler
    if not address:
        raise UsageError("the Dask executor needs its scheduler: pass --scheduler "
                         "tcp://HOST:8786 (or set scheduler: in the pipeline file)")
    return Cluster(address, connect_timeout or spec.connect_timeout)


def _executor(plan: Plan, run: RunRecord, opts: Options, cluster: Cluster | None) -> Executor:
    if cluster is None:
        return LocalExecutor(plan, run, opts)
    from ..pipeline.executors.dask import DaskExecutor  # distributed: only for Dask runs

    return DaskExecutor(plan, run, opts, scheduler=cluster.address, store=default_store_url(),
                        connect_timeout=cluster.timeout)


def execute(file: Path, *, sha: str | None = None, sets: dict[str, str] | None = None,
            only: str | None = None, cold: bool = False, max_parallel: int | None = None,
            show: str = "auto", executor: str | None = None, scheduler: str | None = None,
            connect_timeout: float | None = None) -> RunRecord:
    """Plan and run a pipeline; write its reports and record it in the history.

    It runs on this machine, or on the Dask cluster of ``scheduler`` with ``executor="dask"``,
    waiting ``connect_timeout`` seconds at most for the scheduler and a first worker (each may
    also come from the pipeline file; arguments win). ``show`` is what stderr
    gets as it runs: ``auto`` (a live table on a terminal, else ``lines``), ``lines`` (job
    and step events and every line of output, prefixed with its job), ``quiet`` (job starts
    and ends) or ``none``.
    """
    spec = spec_.load(file)
    cluster = _cluster(spec, executor, scheduler, connect_timeout)
    if cluster is None and any(job.disks for job in spec.jobs.values()):
        diskclient.prestart()  # the CLI has (see cli/main.py); another caller may not have
    plan = plan_.build(spec, file, sha=sha or git_sha(file.resolve().parent), overrides=sets,
                       only=only)
    for warning in plan.warnings:
        click.echo(f"stickyci: warning: {warning}", err=True)
    run_id = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
    run_dir = cache_home() / "runs" / run_id
    run_dir.mkdir(parents=True)
    run = RunRecord(run_id, spec.name, str(plan.file), plan.sha, cold, started_at=time.time(),
                    run_dir=str(run_dir), pid=os.getpid(),
                    jobs=[JobRecord(i.id, i.job, i.matrix, i.needs)
                          for i in plan.instances.values()])
    history = History()
    history.record(run)
    live = show == "auto" and sys.stderr.isatty()
    progress: Progress | None = (None if show == "none" or live else
                                 Lines(run.started_at, quiet=show == "quiet"))
    server = runs_url(default_store_url())
    reporter = Reporter(run, server) if server else None  # a run on a server reports to it
    if reporter:
        progress = Fanout(progress, reporter) if progress else reporter
    opts = Options(run_dir, cold=cold, max_parallel=max_parallel, progress=progress)
    try:
        with LiveTable(run) if live else contextlib.nullcontext():
            asyncio.run(_executor(plan, run, opts, cluster).execute())
    except BaseException as exc:
        _abandon(run, exc, run_masker(plan.secrets))
        raise
    finally:
        run.finished_at = time.time()
        write_reports(run)
        history.record(run)
        if reporter:
            reporter.close()
    return run


def _abandon(run: RunRecord, exc: BaseException, mask: Masker) -> None:
    """Close a run that ``exc`` stopped before its executor finished: it and every job that had
    not finished are recorded as failed (cancelled for Ctrl-C), never left running."""
    stopped = isinstance(exc, KeyboardInterrupt)
    reason = "run interrupted" if stopped else f"run stopped: {mask(describe_fault(exc))}"
    for job in run.jobs:
        if job.state not in FINISHED:
            job.state, job.reason = (CANCELLED if stopped else FAILURE), reason
            job.finished_at = job.finished_at or time.time()
    run.state = CANCELLED if stopped else FAILURE


F = TypeVar("F", bound=Callable[..., Any])  # a click command function


def executor_options(f: F) -> F:
    """``--executor local|dask``, ``--scheduler ADDRESS`` and ``--connect-timeout DURATION``
    (passed on as seconds)."""
    f = click.option("--connect-timeout", metavar="DURATION",
                     callback=lambda _ctx, _param, text: None if text is None
                     else option_duration("connect-timeout", text),
                     help="How long to wait for the Dask scheduler and for a first worker "
                          "(default: connect_timeout: in the file, else 10s); longer for a "
                          "cluster that starts its workers on demand.")(f)
    f = click.option("--scheduler", metavar="ADDRESS",
                     help="The Dask scheduler, e.g. tcp://HOST:8786 (--executor dask).")(f)
    return click.option("--executor", type=click.Choice(["local", "dask"]),
                        help="Where jobs run (default: executor: in the file, else local).")(f)


@click.command()
@click.argument("pipeline", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--sha", help="Commit id for ${{ sha }} (default: git rev-parse HEAD).")
@click.option("--set", "sets", multiple=True, metavar="NAME=VALUE", help="Override a var.")
@click.option("--only", metavar="JOB", help="Run only JOB and the jobs it needs.")
@click.option("--cold", is_flag=True,
              help="The baseline of an A/B comparison: every disk starts empty, and commits "
                   "go to copies private to the run (removed when it ends), never to the "
                   "real keys.")
@click.option("--max-parallel", type=click.IntRange(min=1), help="Jobs running at once.")
@click.option("-q", "--quiet", is_flag=True,
              help="Show only when each job starts and ends, not a live table or step "
                   "output (`stickyci logs RUN -f` follows the output).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the run record as JSON (and nothing while it runs).")
@click.option("--store", "store_url", envvar="STICKYCI_STORE", metavar="URL",
              help="Store for the jobs' disks (default: file:// under the user cache dir).")
@executor_options
def run(pipeline: Path, sha: str | None, sets: tuple[str, ...], only: str | None, cold: bool,
        max_parallel: int | None, quiet: bool, as_json: bool, store_url: str | None,
        executor: str | None, scheduler: str | None, connect_timeout: float | None) -> None:
    """Run a pipeline; exit 0 only if every job that had to run succeeded.

    On a terminal a live table shows every job; piped (a CI log), each step's output is
    printed as it is written, prefixed with its job.
    """
    _use_store(store_url)
    record = execute(pipeline, sha=sha, sets=parse_sets(sets), only=only, cold=cold,
                     max_parallel=max_parallel,
                     show="none" if as_json else "quiet" if quiet else "auto",
                     executor=executor, scheduler=scheduler, connect_timeout=connect_timeout)
    if as_json:
        click.echo(json.dumps(record.to_dict(), indent=2))
    else:
        summary = Path(record.run_dir) / "summary.md"
        failed = [j for j in record.jobs if j.state in (FAILURE, "timed_out")]
        click.echo(f"run {record.id}: {record.state} in {record.seconds:.1f}s, "
                   f"{len(record.jobs)} jobs, {len(failed)} failed; summary: {summary}")
        for j in failed:
            click.echo(printable(f"  FAILED {j.id}: {j.reason} (its output: stickyci logs "
                                 f"{record.id} '{j.id}')"))
    sys.exit(EXIT_CODES.get(record.state, 1))


@click.command()
@click.argument("pipeline", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--runs", type=click.IntRange(min=1), default=3, show_default=True,
              help="Pairs of cold and warm runs, after one warm-up run that is not counted.")
@click.option("--sha", help="Commit id for ${{ sha }} (default: git rev-parse HEAD).")
@click.option("--set", "sets", multiple=True, metavar="NAME=VALUE", help="Override a var.")
@click.option("--chart", "chart_path", type=click.Path(path_type=Path),
              help="Where to write the PNG chart (default: bench-PIPELINE-TIME.png in the "
                   "current directory).")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@click.option("--store", "store_url", envvar="STICKYCI_STORE", metavar="URL",
              help="Store for the jobs' disks (default: file:// under the user cache dir).")
@executor_options
def bench(pipeline: Path, runs: int, sha: str | None, sets: tuple[str, ...],
          chart_path: Path | None, as_json: bool, store_url: str | None, executor: str | None,
          scheduler: str | None, connect_timeout: float | None) -> None:
    """Alternate cold and warm runs of a pipeline; compare per-job medians.

    A warm-up run comes first and is not counted: it commits the disks, so that the first
    warm run starts warm. Each run is announced on stderr with its jobs' starts and ends.
    """
    _use_store(store_url)
    overrides = parse_sets(sets)
    name = safe(spec_.load(pipeline).name or pipeline.stem)
    out = chart_path or Path.cwd() / f"bench-{name}-{time.strftime('%Y%m%d-%H%M%S')}.png"
    once = functools.partial(execute, pipeline, sha=sha, sets=overrides, show="quiet",
                             executor=executor, scheduler=scheduler,
                             connect_timeout=connect_timeout)
    cold: list[RunRecord] = []
    warm: list[RunRecord] = []
    say = functools.partial(click.echo, err=True)
    say(f"bench: {2 * runs + 1} runs: a warm-up (not counted: it commits the disks the first "
        f"warm run mounts), then {runs} cold and {runs} warm, alternating; chart: {out}")
    say("bench: warm-up run")
    _bench_done(once(), say)
    for n in range(1, runs + 1):
        for is_cold, bucket in ((True, cold), (False, warm)):
            kind = "cold" if is_cold else "warm"
            say(f"bench: run {n}/{runs}, {kind}")
            record = once(cold=is_cold)
            _bench_done(record, say)
            if record.state != SUCCESS:
                raise UsageError(f"{kind} run {record.id} ended {record.state}; see "
                                 f"{record.run_dir}/summary.md")
            bucket.append(record)
    rows = compare(cold, warm)
    chart(rows, out, f"{cold[0].pipeline}: cold vs warm ({runs} runs each)")
    if as_json:
        click.echo(json.dumps({"runs": runs, "chart": str(out), "rows": [
            {"job": r.name, "cold": r.cold, "warm": r.warm, "ratio": r.ratio} for r in rows]},
            indent=2))
    else:
        click.echo(table(rows, runs))
        click.echo(f"chart: {out}")


def _bench_done(record: RunRecord, say: Callable[[str], None]) -> None:
    say(f"bench: run {record.id}: {record.state} in {record.seconds:.1f}s "
        f"({record.kind})")
