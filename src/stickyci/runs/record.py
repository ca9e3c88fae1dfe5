"""What a run produced: the state and timings of every job, step and disk operation.

The executor fills these in as it goes; summaries, run history and benchmarks read them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Job and step states.
PENDING, QUEUED, RUNNING = "pending", "queued", "running"
SUCCESS, FAILURE, SKIPPED, CANCELLED, TIMED_OUT = (
    "success", "failure", "skipped", "cancelled", "timed_out")
FINISHED = frozenset({SUCCESS, FAILURE, SKIPPED, CANCELLED, TIMED_OUT})
# An attempt whose worker died under it (the job itself may still succeed on a retry).
LOST = "lost"


@dataclass(slots=True)
class StepRecord:
    """One step of one job."""

    name: str
    state: str = PENDING
    exit_code: int | None = None
    seconds: float = 0.0
    log: str = ""  # path of the step's log, relative to the run directory
    always: bool = False  # a teardown step (``if: always()``)
    started_at: float = 0.0  # time.time() when it started (0: it did not run)


@dataclass(slots=True)
class DiskRecord:
    """One disk of one job: its mount and its commit."""

    key: str
    path: str
    strategy: str = ""
    mount_seconds: float = 0.0
    base_cached: bool = False
    fresh: bool = False
    commit_mode: str = "on-success"
    committed: bool = False
    commit_reason: str = ""
    commit_seconds: float = 0.0
    stored_bytes: int = 0
    size: int = 0
    generation: int = 0
    raced_with: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""


@dataclass(slots=True)
class AttemptRecord:
    """One try at running a job, on one worker ("local" for the local executor)."""

    attempt: int  # 1 for the first try
    worker: str  # the worker's address, e.g. tcp://10.0.0.5:40123
    worker_name: str = ""  # the worker's name (``dask worker --name``), if it has one
    started_at: float = 0.0
    finished_at: float = 0.0
    state: str = RUNNING  # a job state, or LOST when the worker died during the attempt
    reason: str = ""


@dataclass(slots=True)
class JobRecord:
    """One job instance (a matrix job has one per combination)."""

    id: str  # e.g. "build[api]"
    job: str  # the job's name in the pipeline file
    matrix: dict[str, Any] = field(default_factory=dict)
    needs: list[str] = field(default_factory=list)  # ids of the instances it waited for
    state: str = PENDING
    reason: str = ""  # why it failed or was skipped, one line
    queued_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    steps: list[StepRecord] = field(default_factory=list)
    disks: list[DiskRecord] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    worker: str = ""  # where it ran last ("local" for the local executor)
    attempts: list[AttemptRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        # A record read back from JSON (the run history) carries its attempts as dicts.
        self.attempts = [AttemptRecord(**a) if isinstance(a, dict) else a
                         for a in self.attempts]

    @property
    def queue_seconds(self) -> float:
        """Time between becoming ready and starting."""
        return max(0.0, self.started_at - self.queued_at) if self.started_at else 0.0

    @property
    def run_seconds(self) -> float:
        """Time from start to finish."""
        return max(0.0, self.finished_at - self.started_at) if self.started_at else 0.0


@dataclass(slots=True)
class RunRecord:
    """A whole run of a pipeline."""

    id: str
    pipeline: str  # name from the file
    file: str  # path of the pipeline file
    sha: str
    cold: bool
    state: str = RUNNING  # success, failure or cancelled once finished
    started_at: float = 0.0
    finished_at: float = 0.0
    run_dir: str = ""
    jobs: list[JobRecord] = field(default_factory=list)
    executor: str = "local"  # "local", or "dask" with the scheduler's address below
    scheduler: str = ""
    pid: int = 0  # of the process running it (`stickyci logs -f` stops when it is gone)

    @property
    def seconds(self) -> float:
        """Wall time of the run."""
        return max(0.0, self.finished_at - self.started_at)

    @property
    def kind(self) -> str:
        """How its disks started: ``cold`` (``--cold``: empty on purpose), ``warm`` (one
        started from a snapshot committed before the run), ``empty`` (each started empty:
        nothing was committed under its key yet, as in a first run), or ``no disks``."""
        if self.cold:
            return "cold"
        first: dict[str, DiskRecord] = {}  # each key as the first job to mount it found it
        for job in sorted((j for j in self.jobs if j.started_at), key=lambda j: j.started_at):
            for d in job.disks:
                if d.strategy:  # mounted
                    first.setdefault(d.key, d)
        if not first:
            return "no disks"
        return "warm" if any(not d.fresh for d in first.values()) else "empty"

    def to_dict(self) -> dict[str, Any]:
        """JSON form, with the derived timings included."""
        doc = asdict(self)
        doc["seconds"] = self.seconds
        doc["kind"] = self.kind
        for job, jd in zip(self.jobs, doc["jobs"], strict=True):
            jd["queue_seconds"] = job.queue_seconds
            jd["run_seconds"] = job.run_seconds
        return doc
