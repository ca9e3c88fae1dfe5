"""The local executor: ready jobs run concurrently (asyncio), each step a bash process group.

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import StickyError, UsageError
from ..fsutil import remove_tree
from .plan import Instance, Plan
from .record import (
    CANCELLED,
    FAILURE,
    QUEUED,
    RUNNING,
    SKIPPED,
    SUCCESS,
    TIMED_OUT,
    DiskRecord,
    JobRecord,
    RunRecord,
    StepRecord,
)
from .spec import DiskSpec
from .template import condition, render

KILL_GRACE = 5.0
_FAILED = (FAILURE, TIMED_OUT)
_NEEDS_STATUS = re.compile(r"\b(always|cancelled|failure)\s*\(")


@dataclass(slots=True)
class Options:
    """How to run, where to write, how to report.

    ``cold``: every disk starts empty and its real key is never committed; commits go to a
    copy private to the run (so jobs still hand artifacts to each other) that is removed at
    the end. This is the baseline a warm run is compared with.
    """

    run_dir: Path
    cold: bool = False
    max_parallel: int | None = None
    progress: Callable[[JobRecord, str], None] | None = None


class Masker:
    """Replaces secret values with ``***`` in any text that leaves a step."""

    def __init__(self, secrets: dict[str, str]) -> None:
        values = sorted({v for v in secrets.values() if v}, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, values))) if values else None

    def __call__(self, text: str) -> str:
        return self._pattern.sub("***", text) if self._pattern else text


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "job"


class LocalExecutor:
    """Runs a plan on this machine."""

    def __init__(self, plan: Plan, run: RunRecord, opts: Options) -> None:
        self.plan, self.run, self.opts = plan, run, opts
        self.mask = Masker(plan.secrets)
        self.records = {r.id: r for r in run.jobs}
        self.done = {i: asyncio.Event() for i in plan.instances}
        self.cancelled = False
        self.cold_keys: set[str] = set()
        self.procs: set[asyncio.subprocess.Process] = set()
        self.limit = asyncio.Semaphore(opts.max_parallel) if opts.max_parallel else None
        self.job_limits = {name: asyncio.Semaphore(job.max_parallel)
                           for name, job in plan.spec.jobs.items() if job.max_parallel}

    def cancel(self) -> None:
        """Ctrl-C or SIGTERM: stop running steps; teardown steps still run, then we stop."""
        if self.cancelled:
            return
        self.cancelled = True
        for proc in list(self.procs):
            _kill_group(proc, signal.SIGTERM)
            asyncio.get_running_loop().call_later(KILL_GRACE, _kill_group, proc, signal.SIGKILL)

    async def execute(self) -> RunRecord:
        """Run every instance as soon as its needs are done."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.cancel)
        try:
            await asyncio.gather(*(self._instance(i) for i in self.plan.instances.values()))
            await self.drop_cold_disks()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        states = {r.state for r in self.run.jobs}
        self.run.state = (CANCELLED if self.cancelled
                          else FAILURE if states & set(_FAILED) else SUCCESS)
        return self.run

    def _report(self, rec: JobRecord, event: str) -> None:
        if self.opts.progress:
            self.opts.progress(rec, event)

    def _needs_context(self, inst: Instance) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.plan.spec.jobs[inst.job].needs:
            recs = [r for r in self.run.jobs if r.job == name]
            outputs: dict[str, str] = {}
            for r in recs:
                outputs.update(r.outputs)
            states = {r.state for r in recs}
            result = (FAILURE if states & set(_FAILED) else CANCELLED if CANCELLED in states
                      else SKIPPED if states == {SKIPPED} else SUCCESS)
            out[name] = {"outputs": outputs, "result": result}
        return out

    async def _instance(self, inst: Instance) -> None:
        rec = self.records[inst.id]
        try:
            for need in inst.needs:
                await self.done[need].wait()
            await self._gate_and_run(inst, rec)
        except StickyError as exc:
            rec.state, rec.reason = FAILURE, self.mask(str(exc))
            self._report(rec, rec.state)
        finally:
            self.done[inst.id].set()

    async def _gate_and_run(self, inst: Instance, rec: JobRecord) -> None:
        needs = [self.records[n] for n in inst.needs]
        failed = [n.id for n in needs if n.state in _FAILED]
        ok = all(n.state == SUCCESS for n in needs) and not self.cancelled
        status = {"success": ok, "failure": bool(failed), "always": True,
                  "cancelled": self.cancelled}
        env = self.plan.job_env(inst)
        ctx = self.plan.context(inst, self._needs_context(inst), env)
        if not condition(inst.spec.if_, ctx, status, f"jobs.{inst.job}.if"):
            rec.state = CANCELLED if self.cancelled else SKIPPED
            unmet = [n.id for n in needs if n.state != SUCCESS]
            rec.reason = ("run cancelled" if self.cancelled
                          else f"needs not successful: {', '.join(unmet)}" if unmet
                          else f"if: {inst.spec.if_} is false")
            self._report(rec, rec.state)
            return
        rec.state, rec.queued_at = QUEUED, time.time()
        async with contextlib.AsyncExitStack() as stack:
            for sem in (self.limit, self.job_limits.get(inst.job)):
                if sem:
                    await stack.enter_async_context(sem)
            rec.state, rec.started_at, rec.worker = RUNNING, time.time(), "local"
            self._report(rec, RUNNING)
            try:
                await self._run_job(inst, rec, ctx, env)
            finally:
                rec.finished_at = time.time()
                rec.reason = self.mask(rec.reason)
                self._report(rec, rec.state)

    async def _run_job(self, inst: Instance, rec: JobRecord, ctx: dict[str, Any],
                       env: dict[str, str]) -> None:
        ws = self.opts.run_dir / "ws" / _safe(inst.id)
        ws.mkdir(parents=True, exist_ok=True)
        output_file = ws.parent / f"{_safe(inst.id)}.outputs"
        env = {**os.environ, **env,
               "STICKYCI_RUN_ID": self.run.id, "STICKYCI_JOB": inst.id,
               "STICKYCI_WORKSPACE": str(ws), "STICKYCI_SHA": self.plan.sha,
               "STICKYCI_OUTPUT": str(output_file),
               "STICKYCI_MATRIX": json.dumps(inst.matrix),
               "STICKYCI_PIPELINE_DIR": str(self.plan.base_dir)}
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
            rec.outputs = _read_outputs(output_file, inst.spec.outputs, self.mask)
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
                continue
            timeout = step.timeout
            if deadline is not None and not srec.always:
                left = max(0.01, deadline - time.monotonic())
                timeout = min(timeout, left) if timeout else left
            srec.log = f"logs/{_safe(inst.id)}/{n + 1:02d}-{_safe(srec.name)}.log"
            script = render(step.run, ctx, f"{where}.run")
            cwd = _inside(ws, render(step.working_directory, ctx, f"{where}.working_directory"),
                          where) if step.working_directory else ws
            await self._step(srec, script, cwd, {**env, **step.env}, timeout)
            if srec.state != SUCCESS and not step.continue_on_error:
                if not failed:
                    rec.reason = (f"step {srec.name!r} "
                                  + {TIMED_OUT: "timed out", CANCELLED: "was cancelled"}.get(
                                      srec.state, f"exited {srec.exit_code}"))
                    rec.state = srec.state if srec.state in (TIMED_OUT, CANCELLED) else FAILURE
                failed = True
        if self.cancelled and rec.state == SUCCESS:
            rec.state, rec.reason = CANCELLED, "run cancelled"

    async def _step(self, srec: StepRecord, script: str, cwd: Path, env: dict[str, str],
                    timeout: float | None) -> None:
        log = self.opts.run_dir / srec.log
        log.parent.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        srec.state = RUNNING
        with open(log, "w") as out:
            proc = await asyncio.create_subprocess_exec(
                "bash", "-eo", "pipefail", "-c", script, cwd=cwd, env=env,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True)
            self.procs.add(proc)
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
                self.procs.discard(proc)
                # Whatever the step left in the background dies with it.
                _kill_group(proc, signal.SIGKILL)
        srec.exit_code = proc.returncode
        if self.cancelled and srec.state != SUCCESS:
            srec.state = CANCELLED
        srec.seconds = time.monotonic() - start

    async def _pump(self, proc: asyncio.subprocess.Process, out: Any) -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            out.write(self.mask(line.decode(errors="replace")))

    async def _disk_cli(self, *args: str) -> tuple[int, dict[str, Any], str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "stickyci", "disk", *args, "--json",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        doc = json.loads(out) if proc.returncode == 0 and out.strip() else {}
        lines = [ln for ln in err.decode(errors="replace").splitlines() if "error" in ln]
        return proc.returncode or 0, doc, self.mask(lines[-1] if lines else err.decode()[-300:])

    def _key(self, key: str) -> str:
        """The key actually used: in a cold run, a copy private to the run, empty at first."""
        if not self.opts.cold:
            return key
        # A suffix, not a prefix: a token scoped to ``pr-7-*`` must cover the cold copies too.
        private = f"{key}-cold-{self.run.id}"
        self.cold_keys.add(private)
        return private

    async def drop_cold_disks(self) -> None:
        """Remove the private disks of a cold run (their objects go at the next gc)."""
        for key in sorted(self.cold_keys):
            await self._disk_cli("rm", key)

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

