# mypy: disallow-untyped-calls=False
"""The half of the Dask executor that runs inside a Dask worker process.

The client submits :func:`run_job` with a :class:`Ticket`; the worker runs one attempt of the
job with the same :class:`~stickyci.pipeline.job.JobRunner` as the local executor, in a
workspace under its own ``STICKYCI_CACHE_DIR`` (next to its own base cache), and sends its
start, its steps and its log output to the client as Dask events while it runs; a watchdog
(:mod:`.watchdog`) kills its processes if the worker dies, and the next job on the machine clears
what it left (:mod:`.workspaces`). :func:`cancel_run` is called on every worker through
``Client.run``, as are the probes of :mod:`.probes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from distributed import Variable, get_worker

from ...runs import CANCELLED, FAILURE, AttemptRecord, JobRecord
from ..job import JobRunner, JobSetup, LogWriter, describe_fault, safe
from ..masking import Masker
from ..plan import Instance
from ..stop import Stopper
from .watchdog import Watchdog
from .workspaces import claim, forget, jobs_root, sweep_stale

T = TypeVar("T")
# Step output is batched into one event per log at most this often, and at most this big:
# every event goes through the scheduler, which keeps the last ones of each topic.
LOG_INTERVAL = 0.2
LOG_CHUNK = 32 * 1024

# Runs cancelled while this process was up, and the jobs running here per run id.
_lock = threading.Lock()
_cancelled: set[str] = set()
_running: dict[str, list[tuple[asyncio.AbstractEventLoop, Stopper]]] = {}
# Kills the jobs' process groups if this worker process dies (see :mod:`.watchdog`).
_watchdog = Watchdog()


class Hidden(Generic[T]):
    """A value kept out of every repr: Dask prints task arguments in some errors."""

    __slots__ = ("value",)

    def __init__(self, value: T) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "Hidden(***)"


@dataclass(slots=True)
class Ticket:
    """Everything a worker needs to run one job instance (pickled by Dask)."""

    run_id: str
    topic: str  # the run's event topic: start, steps and log output go to the client there
    inst: Instance
    slug: str  # names the instance's workspace, unique in the run
    record: JobRecord  # a fresh record for the worker to fill in
    ctx: dict[str, Any]  # the job's template context, its needs' outputs included
    env: dict[str, str]  # pipeline then job env, rendered
    sha: str
    pipeline_dir: str  # STICKYCI_PIPELINE_DIR: the same path is expected on every worker
    cold: bool
    store: str  # the shared store's URL
    attempts: str  # name of the Dask Variable counting this job's attempts
    secrets: Hidden[dict[str, str]]  # the pipeline's secrets, from the client's environment
    token: Hidden[str | None]  # the client's STICKYCI_TOKEN, if it has one


def log_dir(job_id: str, attempt: int) -> str:
    """Where the step logs of an attempt go in the run directory (the first: as locally)."""
    return f"logs/{safe(job_id)}" + (f".attempt-{attempt}" if attempt > 1 else "")


def run_job(ticket: Ticket) -> JobRecord:
    """Run one attempt of a job in this worker process and return its record.

    The attempt is counted in a Dask Variable first: the scheduler re-runs a task whose worker
    died, and past ``retries`` such re-runs the job is given up without running again.
    Returns a record with no attempts when it did not run (given up, or run cancelled).
    """
    worker = get_worker()
    inst, rec = ticket.inst, ticket.record
    counter = Variable(ticket.attempts)
    attempt = int(counter.get()) + 1
    counter.set(attempt)
    with _lock:
        cancelled = ticket.run_id in _cancelled
    if cancelled or attempt > inst.spec.retries + 1:
        rec.state = CANCELLED if cancelled else FAILURE
        rec.reason = "run cancelled" if cancelled else "given up"
        return rec

    def send(msg: dict[str, Any]) -> None:
        worker.log_event(ticket.topic, {**msg, "job": inst.id, "attempt": attempt})

    me = AttemptRecord(attempt, worker.address, str(worker.name or ""), time.time())
    send({"kind": "start", "worker": me.worker, "name": me.worker_name})
    sweep_stale()
    secrets, token = ticket.secrets.value, ticket.token.value
    mask = Masker({**secrets, "STICKYCI_TOKEN": token or os.environ.get("STICKYCI_TOKEN", "")})
    # The client's store and token, so that every job of a run sees the same store with the
    # same rights; without a client token, the worker's own (its environment) is used.
    store = {"STICKYCI_STORE": ticket.store, **({"STICKYCI_TOKEN": token} if token else {})}
    ws = jobs_root() / safe(ticket.run_id) / f"{ticket.slug}.{attempt}"
    claim(ws)
    logs = EventLogs(send)
    setup = JobSetup(
        ticket.run_id, ticket.sha, Path(ticket.pipeline_dir), ws,
        log_dir=log_dir(inst.id, attempt), logs=logs.open, mask=mask, stop=Stopper(),
        cold=ticket.cold, base_env={**os.environ, **secrets, **store},
        disk_env={**os.environ, **store},
        extra_env={"STICKYCI_WORKER": worker.address, "STICKYCI_ATTEMPT": str(attempt)},
        guard=_watchdog, on_step=lambda n, s: send({"kind": "step", "index": n,
                                                    "step": asdict(s)}))
    try:
        asyncio.run(_attempt(JobRunner(setup), ticket, rec, logs))
    except Exception as exc:  # around the runner (which records its own faults): the events
        rec.state, rec.reason = FAILURE, mask(describe_fault(exc))
    finally:
        if not ws.exists():  # kept after a disk error; swept once this process is gone
            forget(ws)
    me.finished_at, me.state, me.reason = time.time(), rec.state, mask(rec.reason)
    rec.attempts, rec.worker = [me], me.worker
    return rec


async def _attempt(runner: JobRunner, ticket: Ticket, rec: JobRecord, logs: EventLogs) -> None:
    stop = runner.s.stop
    entry = (asyncio.get_running_loop(), stop)
    with _lock:
        _running.setdefault(ticket.run_id, []).append(entry)
        if ticket.run_id in _cancelled:
            stop.cancel()
    flusher = asyncio.create_task(logs.flush_every(LOG_INTERVAL))
    try:
        await runner.run(ticket.inst, rec, ticket.ctx, ticket.env)
    finally:
        flusher.cancel()
        logs.flush()
        with _lock:
            _running[ticket.run_id].remove(entry)
            if not _running[ticket.run_id]:
                del _running[ticket.run_id]


class EventLogs:
    """Step output sent to the client as events, batched per log.

    A line after a quiet spell goes at once; a burst is batched: one event per log every
    ``LOG_INTERVAL`` at most (or per ``LOG_CHUNK``). Events from one worker reach the client
    in the order they were sent, and before the result of the task that sent them: a job's
    logs are complete when its record arrives.
    """

    def __init__(self, send: Callable[[dict[str, Any]], None]) -> None:
        self.send = send
        self.pending: dict[str, list[str]] = {}
        self.sizes: dict[str, int] = {}
        self.sent: dict[str, float] = {}  # when each log last sent, time.monotonic()

    @contextlib.contextmanager
    def open(self, rel: str) -> Iterator[LogWriter]:
        """A writer for the log ``rel``; the client creates the file at once."""
        self.send({"kind": "log", "log": rel, "text": ""})
        self.pending[rel], self.sizes[rel] = [], 0
        try:
            yield _Writer(self, rel)
        finally:
            self._flush(rel)
            del self.pending[rel], self.sizes[rel]
            self.sent.pop(rel, None)

    def write(self, rel: str, text: str) -> None:
        """Queue ``text`` for the log ``rel``; send at once when a chunk is full."""
        self.pending[rel].append(text)
        self.sizes[rel] += len(text)
        if (self.sizes[rel] >= LOG_CHUNK
                or time.monotonic() - self.sent.get(rel, 0.0) >= LOG_INTERVAL):
            self._flush(rel)

    def _flush(self, rel: str) -> None:
        text = "".join(self.pending[rel])
        self.pending[rel], self.sizes[rel] = [], 0
        if text:
            self.send({"kind": "log", "log": rel, "text": text})
            self.sent[rel] = time.monotonic()

    def flush(self) -> None:
        """Send everything queued."""
        for rel in list(self.pending):
            self._flush(rel)

    async def flush_every(self, seconds: float) -> None:
        """Send what is queued every ``seconds``, so a quiet step's last line is not held."""
        while True:
            await asyncio.sleep(seconds)
            self.flush()


@dataclass(slots=True)
class _Writer:
    logs: EventLogs
    rel: str

    def write(self, text: str) -> None:
        self.logs.write(self.rel, text)


# --- called on every worker through Client.run (see also :mod:`.probes`) ----------------------

def cancel_run(run_id: str) -> int:
    """Cancel the jobs of ``run_id`` here (teardown steps still run), and any that start later.

    Returns how many were running.
    """
    with _lock:
        _cancelled.add(run_id)
        running = list(_running.get(run_id, ()))
    for loop, stop in running:
        loop.call_soon_threadsafe(stop.cancel)
    return len(running)

