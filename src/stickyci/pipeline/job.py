"""One job instance: mount its disks, run its steps as bash process groups, commit or discard.

Both executors run a job with this code: the local one in its own event loop, the Dask one
in the worker process the scheduler picked (``asyncio.run`` of :meth:`JobRunner.run`).
Disks are mounted and committed in children of a disk helper process (:mod:`.diskclient`); step
output is masked as it is read (:mod:`.masking`); cancellation and guards are :mod:`.stop`.

A job succeeds only when it gets to the end with nothing gone wrong: its state is ``running``
until then. An exception that reaches the runner is a *fault*: a ``StickyError`` is a failure
the runner understood (a template error at run time, a bad outputs file), anything else an
internal error; either way the job fails, the ``always()`` steps after it still run, and after
an internal error no disk is committed, whatever its mode (see :meth:`JobRunner.fault`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import secrets
import signal
import stat
import sys
import termios
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

from ..errors import StickyError, UsageError
from ..fsutil import remove_tree
from ..runs import (
    CANCELLED,
    FAILURE,
    FINISHED,
    RUNNING,
    SKIPPED,
    SUCCESS,
    TIMED_OUT,
    DiskRecord,
    JobRecord,
    StepRecord,
)
from .diskclient import DiskClient, DiskFailure
from .leftovers import TRACKING_VAR, Traces, describe
from .leftovers import find as find_leftovers
from .leftovers import stop as stop_leftovers
from .masking import MaskedStream, Masker
from .plan import Instance
from .spec import DiskSpec
from .stop import KILL_GRACE, Guard, Stopper, kill_group
from .template import condition, render

# Step output is read this much at a time, whatever its line lengths.
READ_CHUNK = 64 * 1024
# The most of $STICKYCI_OUTPUT that is read: outputs are short values, not artifacts.
MAX_OUTPUTS = 1024 * 1024
_NEEDS_STATUS = re.compile(r"\b(always|cancelled|failure)\s*\(")


def describe_fault(exc: BaseException) -> str:
    """One line for a job that ``exc`` stopped: the message of an error stickyci raised on
    purpose, or ``internal error: TYPE: message`` for anything else."""
    if isinstance(exc, StickyError):
        return " ".join(str(exc).split())
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return "internal error: " + (text if len(text) <= 300 else text[:300] + " …")


def safe(name: str) -> str:
    """``name`` as one path component (job ids hold brackets and commas)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "job"


def cold_key(run_id: str, key: str) -> str:
    """The disk a cold run uses instead of ``key``: private to the run, empty at first."""
    # A suffix, not a prefix: a token scoped to ``pr-7-*`` must cover the cold copies too.
    return f"{key}-cold-{run_id}"


def disk_keys(inst: Instance, ctx: dict[str, Any]) -> list[str]:
    """The keys of the disks ``inst`` mounts, rendered."""
    return [render(d.key, ctx, f"jobs.{inst.job}.disks[{i}].key")
            for i, d in enumerate(inst.spec.disks)]


class LogWriter(Protocol):
    """Where a step's output goes: a file, or a stream back to the client."""

    def write(self, text: str, /) -> object:
        """Append ``text`` (already masked)."""


Logs = Callable[[str], contextlib.AbstractContextManager[LogWriter]]


def file_logs(root: Path) -> Logs:
    """Step logs as files under ``root`` (the run directory), written through as the step
    writes: ``stickyci logs -f`` and ``tail -f`` follow them."""
    @contextlib.contextmanager
    def open_log(rel: str) -> Iterator[LogWriter]:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as out:
            yield _Flushed(out)
    return open_log


@dataclass(slots=True)
class _Flushed:
    out: TextIO

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


def tee_logs(logs: Logs, also: Callable[[str], None]) -> Logs:
    """``logs``, with everything written to them also given to ``also`` (the live output)."""
    @contextlib.contextmanager
    def open_log(rel: str) -> Iterator[LogWriter]:
        with logs(rel) as out:
            yield _Tee(out, also)
    return open_log


@dataclass(slots=True)
class _Tee:
    out: LogWriter
    also: Callable[[str], None]

    def write(self, text: str) -> None:
        self.out.write(text)
        self.also(text)


@dataclass(slots=True)
class JobSetup:
    """Where and how one job instance runs."""

    run_id: str
    sha: str
    pipeline_dir: Path
    workspace: Path  # created for the job; removed after it unless a disk went wrong
    log_dir: str  # step logs are ``<log_dir>/NN-<step>.log``, opened through ``logs``
    logs: Logs
    mask: Masker
    stop: Stopper
    cold: bool = False
    base_env: Mapping[str, str] | None = None  # what steps start from (None: os.environ)
    disk_env: Mapping[str, str] | None = None  # of `stickyci disk` (None: inherited)
    extra_env: dict[str, str] = field(default_factory=dict)  # added to every step's env
    guard: Guard | None = None
    on_step: Callable[[int, StepRecord], None] | None = None  # a step started or ended


class JobRunner:
    """Runs one job instance on this machine, filling in its ``JobRecord``."""

    def __init__(self, setup: JobSetup) -> None:
        self.s = setup
        self.disks = DiskClient(setup.disk_env, setup.guard, setup.mask)
        # The first internal error met (see ``fault``); once set, no disk is committed.
        self.internal_error = ""
        # Every process of the job's steps carries ``<this>.<step>.`` in TRACKING_VAR.
        self.tracking = secrets.token_hex(8)
        self.kept: list[_Kept] = []  # steps whose leftovers run on (``background: keep``)

    @property
    def cancelled(self) -> bool:
        """Whether the run is being cancelled."""
        return self.s.stop.cancelled

    def fault(self, rec: JobRecord, exc: BaseException, step: StepRecord | None = None) -> None:
        """Record that ``exc`` stopped the job (in ``step``, if given): the job fails.

        The one place where an exception becomes a job's result, so that none can leave a job
        looking successful. An error that is not a ``StickyError`` means the runner lost track
        of the job (its output, its processes), so what its disks hold is not something the
        pipeline produced: none is committed, not even with ``commit: always``, which is for
        what failing *steps* leave behind. The previous generation stays.
        """
        reason = self.s.mask(describe_fault(exc))
        if not isinstance(exc, StickyError) and not self.internal_error:
            self.internal_error = reason
        if step is not None:
            if step.state not in FINISHED or step.state == SUCCESS:
                step.state = FAILURE
            reason = f"step {step.name!r} failed: {reason}"
        if rec.state in (FAILURE, TIMED_OUT) and rec.reason:
            rec.reason = f"{rec.reason}; then {reason}"
        else:
            rec.state, rec.reason = FAILURE, reason

    async def run(self, inst: Instance, rec: JobRecord, ctx: dict[str, Any],
                  env: dict[str, str]) -> None:
        """Mount the disks, run the steps, then commit or discard each disk.

        Never raises for a fault of the job (see :meth:`fault`); ``rec`` says how it ended.
        """
        s = self.s
        ws = s.workspace
        output_file = ws.parent / f"{ws.name}.outputs"
        mounted: list[tuple[DiskSpec, DiskRecord, Path]] = []
        rec.state = RUNNING
        try:
            ws.mkdir(parents=True, exist_ok=True)
            env = {**(os.environ if s.base_env is None else s.base_env), **env, **s.extra_env,
                   "STICKYCI_RUN_ID": s.run_id, "STICKYCI_JOB": inst.id,
                   "STICKYCI_WORKSPACE": str(ws), "STICKYCI_SHA": s.sha,
                   "STICKYCI_OUTPUT": str(output_file),
                   "STICKYCI_MATRIX": json.dumps(inst.matrix),
                   "STICKYCI_PIPELINE_DIR": str(s.pipeline_dir)}
            for i, disk in enumerate(inst.spec.disks):
                where = f"jobs.{inst.job}.disks[{i}]"
                key = render(disk.key, ctx, f"{where}.key")
                path = _inside(ws, render(disk.path, ctx, f"{where}.path"), where)
                drec = DiskRecord(key, str(path), commit_mode=disk.commit)
                rec.disks.append(drec)
                if not await self._mount(drec, disk, path):
                    rec.state, rec.reason = FAILURE, f"disk {key}: {drec.error}"
                    break
                mounted.append((disk, drec, path))
            if rec.state == RUNNING:
                await self._steps(inst, rec, ctx, env, ws)
            # Read even after a failure: the summary shows what a failed job did output.
            rec.outputs = _read_outputs(output_file, inst.spec.outputs, s.mask)
            if rec.state == RUNNING:
                rec.state = SUCCESS
        except BaseException as exc:
            self.fault(rec, exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            try:
                await self.stop_kept()  # before the commits: they must not find a disk busy
            except Exception as exc:
                self.fault(rec, exc)
            for disk, drec, path in mounted:
                try:
                    await self._finish_disk(rec, disk, drec, path)
                except Exception as exc:
                    self.fault(rec, exc)
            try:
                # Its values are in the record, masked; the raw file must not stay behind.
                _remove(output_file)
                if all(not d.error for d in rec.disks):
                    remove_tree(ws)
            except Exception as exc:
                self.fault(rec, exc)

    async def _steps(self, inst: Instance, rec: JobRecord, ctx: dict[str, Any],
                     env: dict[str, str], ws: Path) -> None:
        """Run the steps in order; after a failure only those whose ``if`` asks for it."""
        deadline = time.monotonic() + inst.spec.timeout if inst.spec.timeout else None
        for n, step in enumerate(inst.spec.steps):
            where = f"jobs.{inst.job}.steps[{n}]"
            srec = StepRecord(_step_name(step.name, step.run, ctx, where),
                              always=bool(_NEEDS_STATUS.search(step.if_)))
            rec.steps.append(srec)
            failed = rec.state != RUNNING
            try:
                timed_out = deadline is not None and time.monotonic() >= deadline
                status = {"success": not failed and not self.cancelled and not timed_out,
                          "failure": failed or timed_out, "always": True,
                          "cancelled": self.cancelled}
                if not condition(step.if_, ctx, status, f"{where}.if"):
                    srec.state = CANCELLED if self.cancelled else SKIPPED
                    self._step_event(n, srec)
                    continue
                timeout = step.timeout
                if deadline is not None and not srec.always:
                    left = max(0.01, deadline - time.monotonic())
                    timeout = min(timeout, left) if timeout else left
                srec.log = f"{self.s.log_dir}/{n + 1:02d}-{safe(srec.name)}.log"
                script = render(step.run, ctx, f"{where}.run")
                cwd = _inside(ws, render(step.working_directory, ctx,
                                         f"{where}.working_directory"),
                              where) if step.working_directory else ws
                await self._step(n, srec, script, cwd, {**env, **step.env}, timeout,
                                 step.background)
            except Exception as exc:
                self.fault(rec, exc, srec)
                self._step_event(n, srec)
                continue
            if srec.state != SUCCESS and not step.continue_on_error and not failed:
                rec.reason = (f"step {srec.name!r} "
                              + {TIMED_OUT: "timed out", CANCELLED: "was cancelled"}.get(
                                  srec.state, f"exited {srec.exit_code}"))
                rec.state = srec.state if srec.state in (TIMED_OUT, CANCELLED) else FAILURE
        if self.cancelled and rec.state == RUNNING:
            rec.state, rec.reason = CANCELLED, "run cancelled"

    def _step_event(self, n: int, srec: StepRecord) -> None:
        if self.s.on_step:
            self.s.on_step(n, srec)

    async def _step(self, n: int, srec: StepRecord, script: str, cwd: Path,
                    env: dict[str, str], timeout: float | None, background: str) -> None:
        """Run one step; it ends when its shell exits, whatever it left running (see
        :meth:`_leftovers`)."""
        start = time.monotonic()
        srec.state, srec.started_at = RUNNING, time.time()
        self._step_event(n, srec)
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(self.s.logs(srec.log))
            tracking = f"{self.tracking}.{n}."
            rfd, wfd = os.pipe()  # ours, not asyncio's: the step is over when bash is
            try:
                proc = await asyncio.create_subprocess_exec(
                    "bash", "-eo", "pipefail", "-c", script, cwd=cwd,
                    env={**env, TRACKING_VAR: tracking}, stdin=asyncio.subprocess.DEVNULL,
                    stdout=wfd, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
            except BaseException:
                os.close(rfd)
                raise
            finally:
                os.close(wfd)
            output = _Output(rfd, out, self.s.mask)
            stack.callback(output.close)
            traces = Traces(tracking, frozenset({proc.pid}), frozenset({output.inode}))
            self.s.stop.procs.add(proc)
            if self.s.guard:
                self.s.guard.add(proc.pid)
            try:
                await asyncio.wait_for(_exit_unless_failed(proc, output.ended), timeout)
                srec.state = SUCCESS if proc.returncode == 0 else FAILURE
            except TimeoutError:
                kill_group(proc, signal.SIGTERM)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), KILL_GRACE)
                kill_group(proc, signal.SIGKILL)
                await proc.wait()
                out.write(f"\nstickyci: step timed out after {timeout:.1f}s; killed\n")
                srec.state = TIMED_OUT
            finally:
                self.s.stop.procs.discard(proc)
                if proc.returncode is None:  # we got here by an error: nobody reads it now
                    kill_group(proc, signal.SIGKILL)
                    await proc.wait()
                srec.exit_code = proc.returncode
                srec.seconds = time.monotonic() - start  # the step is over: its shell is
                output.drain()  # what it wrote is read, even if a leftover holds the pipe
                kept = await self._leftovers(traces, output, out, stack,
                                             keep=background == "keep")
                if self.s.guard and not kept:
                    self.s.guard.discard(proc.pid)
            if kept:  # its log stays open for what they write, until stop_kept
                self.kept.append(_Kept(traces, output, out, stack.pop_all()))
        if self.cancelled and srec.state != SUCCESS:
            srec.state = CANCELLED
        self._step_event(n, srec)

    async def _leftovers(self, traces: Traces, output: _Output, out: LogWriter,
                         stack: contextlib.ExitStack, *, keep: bool) -> bool:
        """Name the processes a step left running in its log; keep them (``background:
        keep``: they are stopped when the job's steps are done) or stop them now.

        Returns whether any were kept; their output is still read into the step's log.
        """
        found = await asyncio.to_thread(find_leftovers, traces)
        if found and keep:
            out.write(self.s.mask(
                f"\nstickyci: the step left {len(found)} process(es) running, kept until the "
                f"job's steps are done (background: keep): {describe(found)}\n"))
            if self.s.guard:
                for g in {p.pgid for p in found} - traces.groups:
                    self.s.guard.add(g)
                    stack.callback(self.s.guard.discard, g)
            return True
        if found:
            out.write(self.s.mask(
                f"\nstickyci: the step left {len(found)} process(es) running; stopping them "
                f"(background: keep keeps them for later steps): {describe(found)}\n"))
            await stop_leftovers(traces)
        # Every writer is gone (or was never there): the pipe ends now.
        await asyncio.wait({output.ended}, timeout=KILL_GRACE)
        _raise_if_failed(output.ended)
        return False

    async def stop_kept(self) -> None:
        """Stop what ``background: keep`` steps left running, naming it in their logs: the
        job's steps are done (the disks are committed next, and must not be busy)."""
        while self.kept:
            k = self.kept.pop(0)
            with k.stack:  # closes its output, then its log
                found = await stop_leftovers(k.traces)
                if found:
                    k.out.write(self.s.mask(
                        f"\nstickyci: the job's steps are done; stopped {len(found)} process(es)"
                        f" this step left running: {describe(found)}\n"))
                await asyncio.wait({k.output.ended}, timeout=KILL_GRACE)
                if self.s.guard:
                    for g in k.traces.groups:
                        self.s.guard.discard(g)
            _raise_if_failed(k.output.ended)

    def _key(self, key: str) -> str:
        """The key actually used: in a cold run, a copy private to the run, empty at first."""
        return cold_key(self.s.run_id, key) if self.s.cold else key

    async def _mount(self, drec: DiskRecord, disk: DiskSpec, path: Path) -> bool:
        got = await self.disks.mount(self._key(drec.key), path, disk.strategy, disk.trust_owners)
        if isinstance(got, DiskFailure):
            drec.error = got.message
            return False
        drec.strategy, drec.mount_seconds = got["strategy"], got["seconds"]
        drec.base_cached, drec.fresh = got["base_cached"], got["fresh"]
        return True

    async def _finish_disk(self, rec: JobRecord, disk: DiskSpec, drec: DiskRecord,
                           path: Path) -> None:
        ok = rec.state == SUCCESS
        wanted = not self.cancelled and not self.internal_error and (
            disk.commit == "always" or (ok and disk.commit != "never"))
        if wanted:
            mode = "if-missing" if disk.commit == "if-missing" else "on-change"
            got = await self.disks.commit(path, mode)
            if not isinstance(got, DiskFailure):
                drec.committed, drec.commit_reason = got["committed"], got["reason"]
                drec.commit_seconds, drec.stored_bytes = got["seconds"], got["stored_bytes"]
                drec.size, drec.generation = got["size"], got["generation"]
                drec.raced_with = got["raced_with"]
                return
            drec.error = got.message
            if rec.state == SUCCESS:
                rec.state, rec.reason = FAILURE, f"commit of disk {drec.key} failed: {drec.error}"
        else:
            drec.commit_reason = ("run cancelled" if self.cancelled else
                                  self.internal_error if self.internal_error else
                                  "commit: never" if disk.commit == "never" else "job failed")
        # Not committed (or the commit failed): discard, and do not let a straggler keep it.
        gone = await self.disks.discard(path)
        if isinstance(gone, DiskFailure) and not drec.error:
            drec.error = gone.message


def _inside(root: Path, rel: str, where: str) -> Path:
    """``rel`` under ``root``; paths from the pipeline never escape the workspace."""
    path = (root / rel).resolve()
    if path != root.resolve() and root.resolve() not in path.parents:
        raise UsageError(f"{where}: path {rel!r} leaves the job workspace; use a relative path")
    return path


@dataclass(slots=True)
class _Kept:
    """A ``background: keep`` step whose leftovers run on: what stops them, and its log."""

    traces: Traces
    output: _Output
    out: LogWriter
    stack: contextlib.ExitStack  # closes the step's log


class _Output:
    """A step's output pipe, read as the event loop gets to it, masked into the step's log.

    ``ended`` is done at the end of the pipe (no writer left), or with the error that reading
    or logging met (the step is failed at once: it would block on a full pipe, and nothing
    would record what it says).
    """

    def __init__(self, fd: int, out: LogWriter, mask: Masker) -> None:
        self.fd, self.out = fd, out
        self.inode = os.fstat(fd).st_ino
        self.stream = MaskedStream(mask)
        self.loop = asyncio.get_running_loop()
        self.ended: asyncio.Future[None] = self.loop.create_future()
        os.set_blocking(fd, False)
        self.loop.add_reader(fd, self._ready)

    def _ready(self) -> None:
        try:
            self._read()  # one read a call: a flood must not starve the loop
        except Exception as exc:
            self._end(exc)

    def _read(self) -> bool:
        """Read once; False when there is nothing to read now (or ever again)."""
        if self.ended.done():
            return False
        try:
            data = os.read(self.fd, READ_CHUNK)
        except BlockingIOError:
            return False
        if not data:
            self.out.write(self.stream.close())
            self._end(None)
            return False
        self.out.write(self.stream.feed(data))
        return True

    def drain(self) -> None:
        """Read what the pipe holds now (what a step wrote before its shell exited), and no
        more: a leftover may write on forever. A failure ends the output, as in ``_ready``."""
        try:
            buffered = _pending(self.fd) if not self.ended.done() else 0
            for _ in range(buffered // READ_CHUNK + 2):
                if not self._read():
                    return
        except Exception as exc:
            self._end(exc)

    def _end(self, exc: BaseException | None) -> None:
        self.loop.remove_reader(self.fd)
        if not self.ended.done():
            if exc is None:
                self.ended.set_result(None)
            else:
                self.ended.set_exception(exc)

    def close(self) -> None:
        """Stop reading: what was held back for masking is logged, masked."""
        if self.fd < 0:
            return
        try:
            if not self.ended.done():
                self._end(None)
                self.out.write(self.stream.close())
        finally:
            os.close(self.fd)
            self.fd = -1


def _pending(fd: int) -> int:
    """How many bytes a pipe holds."""
    got = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    return int.from_bytes(got, sys.byteorder, signed=True)


async def _exit_unless_failed(proc: asyncio.subprocess.Process,
                              ended: asyncio.Future[None]) -> None:
    """Wait for the step's shell to exit; raise at once if reading its output failed."""
    exited: asyncio.Future[Any] = asyncio.ensure_future(proc.wait())
    try:
        await asyncio.wait({exited, ended}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not exited.done():
            exited.cancel()
    _raise_if_failed(ended)
    await proc.wait()


def _raise_if_failed(ended: asyncio.Future[None]) -> None:
    if ended.done() and (exc := ended.exception()) is not None:
        raise exc


def _step_name(name: str | None, script: str, ctx: dict[str, Any], where: str) -> str:
    """A step's name as shown: its ``name`` rendered (``build ${{ matrix.service }}``), or the
    first line of its script."""
    if not name:
        return script.strip().splitlines()[0][:60] if script.strip() else "step"
    try:
        return render(name, ctx, f"{where}.name")
    except StickyError:
        return name  # a label: its template failing must not fail the step


def _remove(path: Path) -> None:
    """Remove ``path``, whatever a step made of it."""
    if path.is_dir() and not path.is_symlink():
        remove_tree(path)
    else:
        path.unlink(missing_ok=True)


def _read_outputs(path: Path, declared: list[str], mask: Masker) -> dict[str, str]:
    """The ``declared`` outputs a job's steps wrote to ``$STICKYCI_OUTPUT``, masked."""
    fix = "write outputs as NAME=VALUE lines: echo NAME=VALUE >> \"$STICKYCI_OUTPUT\""
    try:
        # Not following a symlink, not blocking on a FIFO: the file is the steps' to shape.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise UsageError(f"$STICKYCI_OUTPUT ({path}) cannot be read ({exc.strerror}): it must "
                         f"be a plain file; {fix}") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(f"$STICKYCI_OUTPUT ({path}) is not a plain file; {fix}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_OUTPUTS + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_OUTPUTS:
        raise UsageError(f"$STICKYCI_OUTPUT ({path}) is over {MAX_OUTPUTS} bytes; outputs are "
                         "short values: hand files to other jobs on a disk")
    lines = data.decode(errors="replace").splitlines()
    found = dict(line.split("=", 1) for line in lines if "=" in line)
    return {k: mask(found[k]) for k in declared if k in found}
