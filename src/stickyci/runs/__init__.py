"""Runs: the record of what a pipeline run did, its reports, and the history on this machine.

The pipeline writes records (:mod:`.record`); this package stores them (:mod:`.history`) and
reports over them (:mod:`.summary`, :mod:`.comparison`) and to a server (:mod:`.report`). It
sits below the pipeline and imports nothing of it, so a report or the history never needs the
executors.
"""

from .comparison import Row, chart, compare, table
from .history import History, record_from_dict
from .record import (
    CANCELLED,
    FAILURE,
    FINISHED,
    LOST,
    PENDING,
    QUEUED,
    RUNNING,
    SKIPPED,
    SUCCESS,
    TIMED_OUT,
    AttemptRecord,
    DiskRecord,
    JobRecord,
    RunRecord,
    StepRecord,
)
from .report import LogTail, Reporter, RunReport, push_runs, runs_url
from .summary import (
    JOB_COLUMNS,
    duration,
    failing_step,
    failures,
    job_rows,
    printable,
    race_warnings,
    render_markdown,
    write_reports,
)

__all__ = [
    "CANCELLED",
    "FAILURE",
    "FINISHED",
    "JOB_COLUMNS",
    "LOST",
    "PENDING",
    "QUEUED",
    "RUNNING",
    "SKIPPED",
    "SUCCESS",
    "TIMED_OUT",
    "AttemptRecord",
    "DiskRecord",
    "History",
    "JobRecord",
    "LogTail",
    "Reporter",
    "Row",
    "RunRecord",
    "RunReport",
    "StepRecord",
    "chart",
    "compare",
    "duration",
    "failing_step",
    "failures",
    "job_rows",
    "printable",
    "push_runs",
    "race_warnings",
    "record_from_dict",
    "render_markdown",
    "runs_url",
    "table",
    "write_reports",
]
