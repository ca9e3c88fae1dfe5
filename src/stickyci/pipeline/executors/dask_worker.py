# mypy: disallow-untyped-calls=False
"""The half of the Dask executor that runs inside a Dask worker process.

The client submits :func:`run_job` with a :class:`Ticket`; the worker runs one attempt of the
job with the same :class:`~stickyci.pipeline.job.JobRunner` as the local executor, in a
workspace under its own ``STICKYCI_CACHE_DIR`` (next to its own base cache), and sends its
start, its steps and its log output to the client as Dask events while it runs. The other
functions here are called on every worker through ``Client.run``: a probe before a run, the
snapshots a base cache holds (placement), and cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from distributed import Variable, get_worker

from ... import __version__
from ...digest import Digest
from ...disks import basecache, holders, mounts
from ...errors import StickyError
from ...fsutil import remove_tree
from ...paths import cache_home
from ..job import JobRunner, JobSetup, LogWriter, Masker, Stopper, describe_fault, safe
from ..plan import Instance
from ..record import CANCELLED, FAILURE, AttemptRecord, JobRecord

log = logging.getLogger("stickyci")
T = TypeVar("T")
# Step output is batched into one event per log at most this often, and at most this big:
# every event goes through the scheduler, which keeps the last ones of each topic.
LOG_INTERVAL = 0.2
LOG_CHUNK = 32 * 1024

# Runs cancelled while this process was up, and the jobs running here per run id.
_lock = threading.Lock()
_cancelled: set[str] = set()
_running: dict[str, list[tuple[asyncio.AbstractEventLoop, Stopper]]] = {}


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
    ws.parent.mkdir(parents=True, exist_ok=True)
    ws.with_name(f"{ws.name}.owner").write_text(_identity(os.getpid()) or "")
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
            _forget(ws)
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


# --- the job's processes die with the worker ----------------------------------------------------

_WATCHDOG = """
import os, signal, sys
groups = set()
for line in sys.stdin:
    (groups.add if line[0] == "+" else groups.discard)(int(line[1:]))
for g in groups:
    try:
        os.killpg(g, signal.SIGKILL)
    except OSError:
        pass
"""


class Watchdog:
    """A helper process that kills the jobs' process groups when this worker process dies.

    Steps and disk commands run in sessions of their own (timeouts kill a whole step), so they
    would outlive a killed worker: a step would keep its mounts busy, and a commit would go on
    to move the ref of a job that is already being retried elsewhere. The helper is told each
    group as it starts and ends; end of input (the kernel closes the pipe when this process
    dies, however it dies) makes it kill every group still registered.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None
        self._groups: set[int] = set()

    def add(self, pgid: int) -> None:
        """Kill group ``pgid`` if this process dies."""
        with self._lock:
            self._groups.add(pgid)
            self._send(f"+{pgid}\n")

    def discard(self, pgid: int) -> None:
        """Group ``pgid`` is over."""
        with self._lock:
            self._groups.discard(pgid)
            self._send(f"-{pgid}\n")

    def _send(self, line: str) -> None:
        for _ in range(2):
            if self._proc is None or self._proc.poll() is not None:
                # Its own session: a Ctrl-C meant for `dask worker` must not stop it first.
                self._proc = subprocess.Popen([sys.executable, "-c", _WATCHDOG],
                                              stdin=subprocess.PIPE, text=True,
                                              start_new_session=True)
                line = "".join(f"+{g}\n" for g in self._groups)
            assert self._proc.stdin is not None
            try:
                self._proc.stdin.write(line)
                self._proc.stdin.flush()
                return
            except BrokenPipeError:
                self._proc = None


_watchdog = Watchdog()


def _identity(pid: int) -> str | None:
    """``PID STARTTIME`` of a live process: a pid reused after a reboot does not match."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else f"{pid} {fields[19]}"


def jobs_root() -> Path:
    """Where this worker's job workspaces are: under its own cache directory."""
    return cache_home() / "jobs"


def sweep_stale() -> None:
    """Clear the workspaces left by a worker process that died: processes, mounts, files."""
    for owner in jobs_root().glob("*/*.owner"):
        try:
            text = owner.read_text()
        except OSError:
            continue
        if text and _identity(int(text.split()[0])) == text:
            continue  # its worker is alive (another worker process may share this cache)
        ws = owner.with_suffix("")
        with contextlib.suppress(StickyError, OSError):
            holders.release(ws, kill=True)
        for m in mounts.all_mounts():
            if Path(m.path).is_relative_to(ws):
                subprocess.run([sys.executable, "-m", "stickyci", "disk", "unmount", m.path,
                                "--kill-holders"], capture_output=True, check=False)
        log.info("removed the workspace %s of a worker that died", ws)
        remove_tree(ws)
        _forget(ws)


def _forget(ws: Path) -> None:
    """Remove the files beside a workspace, and its run's directory once empty."""
    for path in (ws.with_name(f"{ws.name}.owner"), ws.with_name(f"{ws.name}.outputs")):
        path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        ws.parent.rmdir()


# --- called on every worker through Client.run ------------------------------------------------

def probe(pipeline_dir: str) -> dict[str, Any]:
    """Checked before a run: this worker's stickyci version and the pipeline directory."""
    return {"version": __version__, "pipeline_dir": os.path.isdir(pipeline_dir)}


def held(snapshots: list[str]) -> list[str]:
    """Which of ``snapshots`` this worker's base cache holds: a mount of them is instant."""
    return [s for s in snapshots if basecache.base_path(Digest.parse(s)).is_dir()]


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

