"""The local executor: ready jobs run concurrently (asyncio) on this machine."""

from __future__ import annotations

import time
from typing import Any

from ...runs import RUNNING, AttemptRecord, JobRecord
from ..job import JobRunner, JobSetup, file_logs, safe
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
                         log_dir=f"logs/{safe(inst.id)}", logs=file_logs(run_dir),
                         mask=self.mask, stop=self.stop, cold=self.opts.cold,
                         extra_env={"STICKYCI_WORKER": "local", "STICKYCI_ATTEMPT": "1"})
        await JobRunner(setup).run(inst, rec, ctx, env)
        rec.attempts = [AttemptRecord(1, "local", "", rec.started_at, time.time(),
                                      rec.state, self.mask(rec.reason))]
