"""What every executor shares: a job starts once its needs are done and its ``if`` holds.

Subclasses only say how a job that passed its gate runs (:meth:`Executor._start`).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ...runs import (
    CANCELLED,
    FAILURE,
    QUEUED,
    SKIPPED,
    SUCCESS,
    TIMED_OUT,
    JobRecord,
    RunRecord,
    StepRecord,
)
from ..job import cold_key, describe_fault, disk_keys
from ..masking import run_masker
from ..plan import Instance, Plan
from ..stop import Stopper
from ..template import condition

_FAILED = (FAILURE, TIMED_OUT)


class Progress(Protocol):
    """What a run tells as it goes (the CLI shows it: a live table, or lines)."""

    def job(self, rec: JobRecord, event: str) -> None:
        """A job started (``running``), ended (its state) or is retried (``retrying``)."""

    def step(self, rec: JobRecord, step: StepRecord) -> None:
        """A step of ``rec`` started or ended."""

    def output(self, rec: JobRecord, text: str) -> None:
        """A step of ``rec`` wrote ``text`` (masked), as it wrote it."""


class Fanout:
    """Several listeners as one: the CLI's view, and the server the run reports to."""

    def __init__(self, *listeners: Progress) -> None:
        self.listeners = listeners

    def job(self, rec: JobRecord, event: str) -> None:
        """Tell every listener."""
        for listener in self.listeners:
            listener.job(rec, event)

    def step(self, rec: JobRecord, step: StepRecord) -> None:
        """Tell every listener."""
        for listener in self.listeners:
            listener.step(rec, step)

    def output(self, rec: JobRecord, text: str) -> None:
        """Tell every listener."""
        for listener in self.listeners:
            listener.output(rec, text)


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
    progress: Progress | None = None


class Executor:
    """Runs a plan: every instance as soon as its needs are done."""

    def __init__(self, plan: Plan, run: RunRecord, opts: Options) -> None:
        self.plan, self.run, self.opts = plan, run, opts
        self.mask = run_masker(plan.secrets)
        self.stop = Stopper()
        self.records = {r.id: r for r in run.jobs}
        self.done = {i: asyncio.Event() for i in plan.instances}
        self.cold_keys: set[str] = set()
        self.limit = asyncio.Semaphore(opts.max_parallel) if opts.max_parallel else None
        self.job_limits = {name: asyncio.Semaphore(job.max_parallel)
                           for name, job in plan.spec.jobs.items() if job.max_parallel}

    @property
    def cancelled(self) -> bool:
        """Whether the run is being cancelled."""
        return self.stop.cancelled

    def cancel(self) -> None:
        """Ctrl-C or SIGTERM: stop running steps; teardown steps still run, then we stop."""
        self.stop.cancel()

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

    async def drop_cold_disks(self) -> None:
        """Remove the private disks of a cold run (their objects go at the next gc)."""
        for key in sorted(self.cold_keys):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "stickyci", "disk", "rm", key, "--json",
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL)
            await proc.wait()

    def _report(self, rec: JobRecord, event: str) -> None:
        if self.opts.progress:
            self.opts.progress.job(rec, event)

    def _report_step(self, rec: JobRecord, step: StepRecord) -> None:
        if self.opts.progress:
            self.opts.progress.step(rec, step)

    def _report_output(self, rec: JobRecord, text: str) -> None:
        if self.opts.progress:
            self.opts.progress.output(rec, text)

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
        except Exception as exc:
            # Whatever went wrong around the job (its `if`, its context, the executor) fails
            # this job alone: the others run on and the run ends, recorded as failed.
            rec.state, rec.reason = FAILURE, self.mask(describe_fault(exc))
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
        if self.opts.cold:
            self.cold_keys.update(cold_key(self.run.id, k) for k in disk_keys(inst, ctx))
        rec.state, rec.queued_at = QUEUED, time.time()
        async with contextlib.AsyncExitStack() as stack:
            for sem in (self.limit, self.job_limits.get(inst.job)):
                if sem:
                    await stack.enter_async_context(sem)
            try:
                await self._start(inst, rec, ctx, env)
            finally:
                rec.finished_at = time.time()
                rec.reason = self.mask(rec.reason)
                self._report(rec, rec.state)

    async def _start(self, inst: Instance, rec: JobRecord, ctx: dict[str, Any],
                     env: dict[str, str]) -> None:
        """Run one job that passed its gate; mark it running when it really starts."""
        raise NotImplementedError
