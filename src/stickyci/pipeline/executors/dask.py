# mypy: disallow-untyped-calls=False
"""The Dask executor: every job runs on a worker of a Dask distributed cluster.

The DAG stays with the client. A job is submitted when its needs are done, because what it
is depends on them: its ``if``, the outputs in its templates, and the snapshot its disks will
mount (committed by a need in this very run) are known only then; and so is the best place
for it. Each job is one Dask task, :func:`.dask_worker.run_job`, which runs the job with the
local job runner in the worker process.

Placement: of the workers with a free thread and the job's resources free, the one whose base
cache holds the most of the job's latest snapshots; with none free, the scheduler decides, so
a job never queues behind a warm worker while another one could start it.

Faults: the scheduler re-runs a task whose worker died; the job counts its attempts and gives
up past its ``retries``. Its processes die with its worker (a watchdog), so a commit of a lost
attempt never moves a ref. Each attempt is recorded with its worker.

Logs: workers send step output as events on the run's topic; the client writes them into the
run directory as they arrive, so summaries and history are the same as with a local run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from distributed import Client, KilledWorker, Variable

from ... import __version__
from ...disks import read_ref
from ...errors import UsageError
from ...runs import (
    CANCELLED,
    FAILURE,
    LOST,
    RUNNING,
    AttemptRecord,
    JobRecord,
    RunRecord,
    StepRecord,
)
from ...store import Backend, open_backend
from ..job import disk_keys, safe
from ..plan import Instance, Plan
from .base import Executor, Options
from .dask_worker import Hidden, Ticket, cancel_run, run_job
from .probes import held, probe

log = logging.getLogger("stickyci")


@dataclass(frozen=True, slots=True)
class WorkerView:
    """A worker as placement sees it."""

    address: str
    nthreads: int
    resources: Mapping[str, float]  # what it offers (`dask worker --resources`)
    busy: int  # tasks it runs or has queued: ours and other clients'
    used: Mapping[str, float]  # resources our jobs hold there
    warmth: int  # bytes of the job's latest snapshots already in its base cache


def choose_worker(workers: Sequence[WorkerView], need: Mapping[str, float],
                  unplaced: int = 0) -> str | None:
    """The worker a job should start on, or None to let the scheduler decide.

    Only a worker with a free thread and the job's resources free right now is a candidate:
    the warmest wins, then the least busy. With none free, the scheduler decides, because
    waiting for a warm worker could queue the job behind a long one while another worker
    goes idle. ``unplaced`` jobs submitted earlier without a worker take free threads first.
    """
    free = [w for w in workers if w.busy < w.nthreads and all(
        w.resources.get(r, 0) - w.used.get(r, 0) >= n for r, n in need.items())]
    if len(free) <= unplaced:
        return None
    return max(free, key=lambda w: (w.warmth, w.nthreads - w.busy, w.address)).address


class DaskExecutor(Executor):
    """Runs a plan on a Dask cluster; reports, history and exit code are the local ones."""

    def __init__(self, plan: Plan, run: RunRecord, opts: Options, *, scheduler: str,
                 store: str, connect_timeout: float) -> None:
        """``connect_timeout``: seconds to wait for the scheduler, then for a first worker."""
        super().__init__(plan, run, opts)
        self.address, self.store = scheduler, store
        self.connect_timeout = connect_timeout
        self.token = os.environ.get("STICKYCI_TOKEN") or None
        self.topic = f"stickyci-{run.id}"
        self.client: Client | None = None
        self.backend: Backend | None = None
        self.placing = asyncio.Lock()
        # Our jobs submitted and not finished: the worker each occupies (None: not known yet,
        # the scheduler chose) and the resources it holds.
        self.where: dict[str, str | None] = {}
        self.holds: dict[str, Mapping[str, float]] = {}
        self.background: set[asyncio.Task[None]] = set()
        # Unique per instance (two ids can look alike once made safe for a name).
        self.slugs = {i: f"{n}-{safe(i)}" for n, i in enumerate(plan.instances)}
        run.executor, run.scheduler = "dask", scheduler

    async def execute(self) -> RunRecord:
        """Connect, check the cluster can run the plan, then run it."""
        async with self._connect() as client:
            self.client = client
            await self._check(client)
            client.subscribe_topic(self.topic, self._on_event)
            try:
                return await super().execute()
            finally:
                client.unsubscribe_topic(self.topic)

    @contextlib.asynccontextmanager
    async def _connect(self) -> AsyncIterator[Client]:
        try:
            client = await Client(self.address, asynchronous=True, timeout=self.connect_timeout,
                                  name=f"stickyci-{self.run.id}")
        except (OSError, TimeoutError, ValueError) as exc:
            why = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise UsageError(f"cannot reach the Dask scheduler at {self.address} ({why}); "
                             "start one with `dask scheduler` and pass its address with "
                             "--scheduler, or run with --executor local") from exc
        try:
            yield client
        finally:
            await client.close()

    async def _check(self, client: Client) -> None:
        """Fail before anything runs when no worker can: none at all, no stickyci, resources."""
        try:
            # Typed for the synchronous client; an asynchronous one returns a coroutine.
            await cast(Awaitable[None],
                       client.wait_for_workers(1, timeout=self.connect_timeout))
        except TimeoutError:
            raise UsageError(f"the Dask scheduler at {self.address} has no workers after "
                             f"{self.connect_timeout:g}s; start some with `dask worker "
                             f"{self.address}`, or wait longer with --connect-timeout") from None
        found = await client.run(probe, str(self.plan.base_dir), on_error="return")
        for addr, got in sorted(found.items()):
            if isinstance(got, BaseException):
                raise UsageError(f"worker {addr} cannot run stickyci jobs "
                                 f"({type(got).__name__}: {got}); install stickyci "
                                 f"{__version__} on every worker")
            if got["version"] != __version__:
                raise UsageError(f"worker {addr} runs stickyci {got['version']}, this client "
                                 f"{__version__}; install the same version everywhere")
        missing = sorted(a for a, got in found.items() if not got["pipeline_dir"])
        if missing:
            log.warning("the pipeline directory %s is missing on worker(s) %s: steps that "
                        "use $STICKYCI_PIPELINE_DIR will fail there", self.plan.base_dir,
                        ", ".join(missing))
        if self.store.startswith("file:") or "://" not in self.store:
            log.warning("store %s is a directory: workers on other machines will not share "
                        "it; use a stickyci server (http://) or s3:// for a cluster",
                        self.store)
        offered = {a: w.get("resources") or {} for a, w in (await _workers(client)).items()}
        for inst in self.plan.instances.values():
            need = inst.spec.resources
            if need and not any(all(res.get(r, 0) >= n for r, n in need.items())
                                for res in offered.values()):
                have = "; ".join(f"{a}: {_resources(r) or 'none'}"
                                 for a, r in sorted(offered.items()))
                raise UsageError(f"{self.plan.file}: jobs.{inst.job}.resources: no worker "
                                 f"offers {_resources(need)} (workers offer {have}); start "
                                 f"workers with `dask worker --resources {_resources(need)}`")

    def cancel(self) -> None:
        """Ctrl-C or SIGTERM: cancel the run's jobs on every worker; teardown still runs."""
        if self.cancelled:
            return
        self.stop.cancel()
        self._background(self._cancel_on(None))

    async def _cancel_on(self, workers: list[str] | None) -> None:
        assert self.client is not None
        with contextlib.suppress(OSError):  # no scheduler: nothing runs there any more
            await self.client.run(cancel_run, self.run.id, workers=workers, on_error="return")

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _start(self, inst: Instance, rec: JobRecord, ctx: dict[str, Any],
                     env: dict[str, str]) -> None:
        client = self.client
        assert client is not None
        keys = [] if self.opts.cold else disk_keys(inst, ctx)
        slug = self.slugs[inst.id]
        counter = Variable(f"{self.topic}-{slug}-attempts", client=client)
        await counter.set(0)
        ticket = Ticket(self.run.id, self.topic, inst, slug,
                        JobRecord(rec.id, rec.job, rec.matrix, rec.needs),
                        ctx, env, self.plan.sha, str(self.plan.base_dir), self.opts.cold,
                        self.store, counter.name, Hidden(dict(self.plan.secrets)),
                        Hidden(self.token))
        need = dict(inst.spec.resources)
        async with self.placing:
            # One placement at a time, so each sees the ones before it.
            target = await self._place(keys, need)
            self.where[inst.id], self.holds[inst.id] = target, need
            future = client.submit(run_job, ticket, key=f"stickyci-{self.run.id}-{slug}",
                                   pure=False, workers=[target] if target else None,
                                   allow_other_workers=target is not None,
                                   resources=need or None)
        try:
            remote: JobRecord = await future
        except KilledWorker:
            lost = self._lose_running(rec)
            rec.state = FAILURE
            rec.reason = (f"its worker died during {len(lost)} attempt(s) ({', '.join(lost)}) "
                          "and the Dask scheduler gave up on it (distributed.scheduler."
                          "allowed-failures)")
            return
        except Exception as exc:  # the task itself failed: say so on the job, go on
            self._lose_running(rec)
            rec.state = FAILURE
            why = " ".join(str(exc).split())[:300]
            rec.reason = f"its Dask task failed: {type(exc).__name__}: {why}"
            return
        finally:
            self.where.pop(inst.id, None)
            self.holds.pop(inst.id, None)
            counter.delete()  # sent to the scheduler, not awaited
            future.release()
        self._merge(rec, remote)

    async def _place(self, keys: list[str], need: Mapping[str, float]) -> str | None:
        """Where to submit a job mounting ``keys``; see :func:`choose_worker`."""
        client = self.client
        assert client is not None
        workers = await _workers(client)
        processing: dict[str, Any] = await client.processing()
        ours = Counter(w for w in self.where.values() if w)
        used: dict[str, Counter[str]] = {}
        for job, w in self.where.items():
            if w:
                used.setdefault(w, Counter()).update(self.holds[job])
        unplaced = sum(1 for w in self.where.values() if w is None)
        sizes = await asyncio.to_thread(self._latest, keys) if keys else {}
        warmth: dict[str, int] = {}
        if sizes and len(workers) > 1:
            got = await client.run(held, sorted(sizes), on_error="return")
            warmth = {a: sum(sizes[s] + 1 for s in snaps) for a, snaps in got.items()
                      if isinstance(snaps, list)}
        views = [WorkerView(a, w["nthreads"], w.get("resources") or {},
                            max(len(processing.get(a, ())), ours[a]), used.get(a, Counter()),
                            warmth.get(a, 0))
                 for a, w in workers.items()]
        return choose_worker(views, need, unplaced)

    def _latest(self, keys: list[str]) -> dict[str, int]:
        """The latest snapshot of each disk and its size (store reads: run in a thread)."""
        if self.backend is None:
            self.backend = open_backend(self.store)
        out = {}
        for key in keys:
            ref = read_ref(self.backend, key)
            if ref and ref.latest:
                out[ref.latest.snapshot.hex] = ref.latest.size
        return out

    # --- events from the workers, in the order each worker sent them -------------------------

    def _on_event(self, event: tuple[float, dict[str, Any]]) -> None:
        msg = event[1]
        rec = self.records.get(msg.get("job", ""))
        if rec is None:
            return
        if msg["kind"] == "log":
            if self._write_log(msg["log"], msg["text"]):
                self._report_output(rec, msg["text"])
        elif msg["kind"] == "start":
            self._started(rec, msg)
        elif msg["kind"] == "step" and rec.attempts and rec.attempts[-1].attempt == msg["attempt"]:
            n = msg["index"]
            rec.steps[n:n + 1] = [StepRecord(**msg["step"])]
            self._report_step(rec, rec.steps[n])

    def _write_log(self, rel: str, text: str) -> bool:
        """Append to a step's log; False when ``rel`` is not a log path this client gave out."""
        parts = Path(rel).parts
        if not parts or parts[0] != "logs" or ".." in parts or Path(rel).is_absolute():
            return False
        path = self.opts.run_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(text)
        return True

    def _started(self, rec: JobRecord, msg: dict[str, Any]) -> None:
        lost = self._lose_running(rec)
        rec.attempts.append(AttemptRecord(msg["attempt"], msg["worker"], msg["name"],
                                          time.time()))
        rec.worker = msg["worker"]
        if rec.id in self.where:  # not finished (a straggler's start must not count)
            self.where[rec.id] = msg["worker"]
        rec.steps = []
        if rec.state != RUNNING:
            rec.state, rec.started_at = RUNNING, time.time()
            self._report(rec, RUNNING)
        else:
            rec.reason = (f"worker {', '.join(lost)} died; attempt {msg['attempt']} on "
                          f"{msg['worker']}")
            self._report(rec, "retrying")
        if self.cancelled:  # it started after the cancel went out
            self._background(self._cancel_on([msg["worker"]]))

    def _lose_running(self, rec: JobRecord) -> list[str]:
        """Mark attempts (and their steps) still running as lost; return their workers."""
        lost = []
        for a in rec.attempts:
            if a.state == RUNNING:
                a.state, a.finished_at = LOST, time.time()
                a.reason = f"worker {a.worker} died during the attempt"
                lost.append(a.worker)
        for step in rec.steps:
            if step.state == RUNNING:
                step.state = LOST
        return lost

    def _merge(self, rec: JobRecord, remote: JobRecord) -> None:
        """Take the worker's record of the attempt that finished."""
        if not remote.attempts:  # it did not run: cancelled, or given up
            lost = self._lose_running(rec)
            gone = [a.worker for a in rec.attempts if a.state == LOST]
            rec.state = remote.state
            retries = self.plan.instances[rec.id].spec.retries
            rec.reason = (remote.reason if remote.state == CANCELLED else
                          f"its worker died under it {len(gone)} time(s) "
                          f"({', '.join(gone or lost)}); no retries left (retries: {retries})")
            return
        done = remote.attempts[-1]
        mine = next((a for a in rec.attempts if a.attempt == done.attempt), None)
        if mine is None:
            rec.attempts.append(done)
        else:
            mine.state, mine.reason, mine.finished_at = done.state, done.reason, time.time()
        self._lose_running(rec)  # any other attempt seen starting, never ending
        rec.steps, rec.disks, rec.outputs = remote.steps, remote.disks, remote.outputs
        rec.state, rec.reason, rec.worker = remote.state, remote.reason, done.worker
        if not rec.started_at:
            rec.started_at = time.time()


async def _workers(client: Client) -> dict[str, dict[str, Any]]:
    """Every worker now, by address: nthreads, resources, name (an asynchronous client's
    ``scheduler_info()`` has no per-worker part)."""
    assert client.scheduler is not None
    identity: dict[str, Any] = await client.scheduler.identity()
    workers: dict[str, dict[str, Any]] = identity["workers"]
    return workers


def _resources(res: Mapping[str, float]) -> str:
    return ",".join(f"{k}={v:g}" for k, v in sorted(res.items()))
