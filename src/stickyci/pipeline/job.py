"""One job instance: mount its disks, run its steps as bash process groups, commit or discard.

Both executors run a job with this code: the local one in its own event loop, the Dask one
in the worker process the scheduler picked (``asyncio.run`` of :meth:`JobRunner.run`).
Disks are mounted and committed through the ``stickyci disk`` CLI in a subprocess: it keeps
the event loop free while a commit forks its workers, and is exactly what a user would run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..errors import UsageError
from ..fsutil import remove_tree
from .plan import Instance
from .record import (
    CANCELLED,
    FAILURE,
    RUNNING,
    SKIPPED,
    SUCCESS,
    TIMED_OUT,
    DiskRecord,
    JobRecord,
    StepRecord,
)
from .spec import DiskSpec
from .template import condition, render

KILL_GRACE = 5.0
_NEEDS_STATUS = re.compile(r"\b(always|cancelled|failure)\s*\(")


class Masker:
    """Replaces secret values with ``***`` in any text that leaves a step."""

    def __init__(self, secrets: Mapping[str, str]) -> None:
        values = sorted({v for v in secrets.values() if v}, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, values))) if values else None

    def __call__(self, text: str) -> str:
        return self._pattern.sub("***", text) if self._pattern else text


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
    """Step logs as files under ``root`` (the run directory)."""
    @contextlib.contextmanager
    def open_log(rel: str) -> Iterator[LogWriter]:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as out:
            yield out
    return open_log


class Guard(Protocol):
    """Told about every process group a job starts, so they can die with the job's process."""

    def add(self, pgid: int) -> None:
        """A group started."""

    def discard(self, pgid: int) -> None:
        """A group ended (it has been killed, whatever was left of it)."""


class Stopper:
    """Cancellation of the jobs that share it: stop running steps; teardown steps still run."""

    def __init__(self) -> None:
        self.cancelled = False
        self.procs: set[asyncio.subprocess.Process] = set()

    def cancel(self) -> None:
        """Ctrl-C or SIGTERM (call in the jobs' event loop)."""
        if self.cancelled:
            return
        self.cancelled = True
        for proc in list(self.procs):
            _kill_group(proc, signal.SIGTERM)
            asyncio.get_running_loop().call_later(KILL_GRACE, _kill_group, proc, signal.SIGKILL)


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

    @property
    def cancelled(self) -> bool:
        """Whether the run is being cancelled."""
        return self.s.stop.cancelled

    async def run(self, inst: Instance, rec: JobRecord, ctx: dict[str, Any],
                  env: dict[str, str]) -> None:
        """Mount the disks, run the steps, then commit or discard each disk."""
        s = self.s
        ws = s.workspace
        ws.mkdir(parents=True, exist_ok=True)
        output_file = ws.parent / f"{ws.name}.outputs"
        env = {**(os.environ if s.base_env is None else s.base_env), **env, **s.extra_env,
               "STICKYCI_RUN_ID": s.run_id, "STICKYCI_JOB": inst.id,
               "STICKYCI_WORKSPACE": str(ws), "STICKYCI_SHA": s.sha,
               "STICKYCI_OUTPUT": str(output_file),
               "STICKYCI_MATRIX": json.dumps(inst.matrix),
               "STICKYCI_PIPELINE_DIR": str(s.pipeline_dir)}
        mounted: list[tuple[DiskSpec, DiskRecord, Path]] = []
        rec.state = SUCCESS
        try:
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
            if rec.state == SUCCESS:
                await self._steps(inst, rec, ctx, env, ws)
        finally:
            for disk, drec, path in mounted:
                await self._finish_disk(rec, disk, drec, path)
            rec.outputs = _read_outputs(output_file, inst.spec.outputs, s.mask)
            if all(not d.error for d in rec.disks):
                remove_tree(ws)

    async def _steps(self, inst: Instance, rec: JobRecord, ctx: dict[str, Any],
                     env: dict[str, str], ws: Path) -> None:
        deadline = time.monotonic() + inst.spec.timeout if inst.spec.timeout else None
        failed = False
        for n, step in enumerate(inst.spec.steps):
            where = f"jobs.{inst.job}.steps[{n}]"
            srec = StepRecord(step.name or step.run.strip().splitlines()[0][:60],
                              always=bool(_NEEDS_STATUS.search(step.if_)))
            rec.steps.append(srec)
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
            cwd = _inside(ws, render(step.working_directory, ctx, f"{where}.working_directory"),
                          where) if step.working_directory else ws
            await self._step(n, srec, script, cwd, {**env, **step.env}, timeout)
            if srec.state != SUCCESS and not step.continue_on_error:
                if not failed:
                    rec.reason = (f"step {srec.name!r} "
                                  + {TIMED_OUT: "timed out", CANCELLED: "was cancelled"}.get(
                                      srec.state, f"exited {srec.exit_code}"))
                    rec.state = srec.state if srec.state in (TIMED_OUT, CANCELLED) else FAILURE
                failed = True
        if self.cancelled and rec.state == SUCCESS:
            rec.state, rec.reason = CANCELLED, "run cancelled"

    def _step_event(self, n: int, srec: StepRecord) -> None:
        if self.s.on_step:
            self.s.on_step(n, srec)

    async def _step(self, n: int, srec: StepRecord, script: str, cwd: Path,
                    env: dict[str, str], timeout: float | None) -> None:
        start = time.monotonic()
        srec.state = RUNNING
        self._step_event(n, srec)
        with self.s.logs(srec.log) as out:
            proc = await asyncio.create_subprocess_exec(
                "bash", "-eo", "pipefail", "-c", script, cwd=cwd, env=env,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True)
            self.s.stop.procs.add(proc)
            if self.s.guard:
                self.s.guard.add(proc.pid)
            pump = asyncio.create_task(self._pump(proc, out))
            try:
                await asyncio.wait_for(proc.wait(), timeout)
                await pump
                srec.state = SUCCESS if proc.returncode == 0 else FAILURE
            except TimeoutError:
                _kill_group(proc, signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), KILL_GRACE)
                except TimeoutError:
                    _kill_group(proc, signal.SIGKILL)
                    await proc.wait()
                pump.cancel()
                out.write(f"\nstickyci: step timed out after {timeout:.1f}s; killed\n")
                srec.state = TIMED_OUT
            finally:
                self.s.stop.procs.discard(proc)
                # Whatever the step left in the background dies with it.
                _kill_group(proc, signal.SIGKILL)
                if self.s.guard:
                    self.s.guard.discard(proc.pid)
        srec.exit_code = proc.returncode
        if self.cancelled and srec.state != SUCCESS:
            srec.state = CANCELLED
        srec.seconds = time.monotonic() - start
        self._step_event(n, srec)

    async def _pump(self, proc: asyncio.subprocess.Process, out: LogWriter) -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            out.write(self.s.mask(line.decode(errors="replace")))

    async def _disk_cli(self, *args: str) -> tuple[int, dict[str, Any], str]:
        guard = self.s.guard
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "stickyci", "disk", *args, "--json",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=self.s.disk_env,
            # Guarded: a group of its own (with the workers a commit forks), so the guard can
            # end all of it and a commit never outlives the process that ran the job.
            start_new_session=guard is not None)
        if guard:
            guard.add(proc.pid)
        try:
            out, err = await proc.communicate()
        finally:
            if guard:
                _kill_group(proc, signal.SIGKILL)
                guard.discard(proc.pid)
        doc = json.loads(out) if proc.returncode == 0 and out.strip() else {}
        lines = [ln for ln in err.decode(errors="replace").splitlines() if "error" in ln]
        return proc.returncode or 0, doc, self.s.mask(lines[-1] if lines
                                                      else err.decode()[-300:])

    def _key(self, key: str) -> str:
        """The key actually used: in a cold run, a copy private to the run, empty at first."""
        return cold_key(self.s.run_id, key) if self.s.cold else key

    async def _mount(self, drec: DiskRecord, disk: DiskSpec, path: Path) -> bool:
        code, doc, err = await self._disk_cli("mount", self._key(drec.key), str(path),
                                              "--strategy", disk.strategy)
        if code:
            drec.error = err.removeprefix("stickyci: error: ")
            return False
        drec.strategy, drec.mount_seconds = doc["strategy"], doc["seconds"]
        drec.base_cached, drec.fresh = doc["base_cached"], doc["fresh"]
        return True

    async def _finish_disk(self, rec: JobRecord, disk: DiskSpec, drec: DiskRecord,
                           path: Path) -> None:
        ok = rec.state == SUCCESS
        wanted = not self.cancelled and (
            disk.commit == "always" or (ok and disk.commit != "never"))
        if wanted:
            mode = "if-missing" if disk.commit == "if-missing" else "on-change"
            code, doc, err = await self._disk_cli("commit", str(path), "--mode", mode)
            if code == 0:
                drec.committed, drec.commit_reason = doc["committed"], doc["reason"]
                drec.commit_seconds, drec.stored_bytes = doc["seconds"], doc["stored_bytes"]
                drec.size, drec.generation = doc["size"], doc["generation"]
                drec.raced_with = doc["raced_with"]
                return
            drec.error = err.removeprefix("stickyci: error: ")
            if rec.state == SUCCESS:
                rec.state, rec.reason = FAILURE, f"commit of disk {drec.key} failed: {drec.error}"
        else:
            drec.commit_reason = ("run cancelled" if self.cancelled else
                                  "commit: never" if disk.commit == "never" else "job failed")
        # Not committed (or the commit failed): discard, and do not let a straggler keep it.
        code, _, err = await self._disk_cli("unmount", str(path), "--kill-holders")
        if code and not drec.error:
            drec.error = err.removeprefix("stickyci: error: ")


def _kill_group(proc: asyncio.subprocess.Process, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _inside(root: Path, rel: str, where: str) -> Path:
    """``rel`` under ``root``; paths from the pipeline never escape the workspace."""
    path = (root / rel).resolve()
    if path != root.resolve() and root.resolve() not in path.parents:
        raise UsageError(f"{where}: path {rel!r} leaves the job workspace; use a relative path")
    return path


def _read_outputs(path: Path, declared: list[str], mask: Masker) -> dict[str, str]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return {}
    found = dict(line.split("=", 1) for line in lines if "=" in line)
    return {k: mask(found[k]) for k in declared if k in found}
