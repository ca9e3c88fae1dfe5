"""The local executor: ready jobs run concurrently (asyncio) on this machine."""

from __future__ import annotations

import time
from typing import Any

from ...runs import RUNNING, AttemptRecord, JobRecord
from ..job import JobRunner, JobSetup, file_logs, safe, tee_logs
from ..plan import Instance
from .base import Executor


class LocalExecutor(Executor):
    """Runs a plan on this machine; a job's workspace and logs are in the run directory."""

    async def _start(self, inst: Instance, rec: JobRecord, ctx: dict[str, Any],
                     env: dict[str, str]) -> None:
        rec.state, rec.started_at, rec.worker = RUNNING, time.time(), "local"
        self._report(rec, RUNNING)
        run_dir = self.opts.run_dir
        setup = JobSetup(self.run.id, self.plan.sha, self.plan.base_dir,
                         workspace=run_dir / "ws" / safe(inst.id),
                         log_dir=f"logs/{safe(inst.id)}",
                         logs=tee_logs(file_logs(run_dir),
                                       lambda text: self._report_output(rec, text)),
                         mask=self.mask, stop=self.stop, cold=self.opts.cold,
                         extra_env={"STICKYCI_WORKER": "local", "STICKYCI_ATTEMPT": "1"},
                         on_step=lambda _, step: self._report_step(rec, step))
        await JobRunner(setup).run(inst, rec, ctx, env)
        rec.attempts = [AttemptRecord(1, "local", "", rec.started_at, time.time(),
                                      rec.state, self.mask(rec.reason))]
