"""Reporting runs to a stickyci server: the wire form of a report, and the client that sends it.

A run whose store is a server reports itself as it goes (:class:`Reporter`, a listener of the
executor's progress events); a run recorded on a ``file://`` or ``s3://`` store is pushed
afterwards (:func:`push_runs`). A report is the run's record and the tails of its steps' logs, read
from the run directory when it is sent. Reporting never fails nor slows a run: it sends from a
thread, at most once a second, and a server that cannot be reached is logged once.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
from pydantic import BaseModel, ConfigDict, Field

from ..errors import StickyError, UsageError
from .record import JobRecord, RunRecord, StepRecord

log = logging.getLogger("stickyci")

TAIL_BYTES = 4096
"""How much of the end of each step's log a report carries."""
INTERVAL = 1.0
"""Seconds between two reports of a running run: a person watching sees it move, the server
is not flooded by a chatty step."""
FINAL_TIMEOUT = 5.0
"""The most the last report may add to the end of a run."""
_HEADERS = {"content-type": "application/json"}


class LogTail(BaseModel):
    """The end of one step's log: job ``job``'s step number ``step`` (from 0)."""

    model_config = ConfigDict(extra="forbid")

    job: str = Field(max_length=1000)
    step: int = Field(ge=0, lt=10_000)
    text: str = Field(max_length=2 * TAIL_BYTES)


class RunReport(BaseModel):
    """What a runner sends a server about a run, and what the server gives back.

    Fields the record's types do not have are dropped, not refused: the derived timings its
    JSON form carries, and whatever a newer stickyci adds (as the run history reads them)."""

    model_config = ConfigDict(extra="ignore")

    record: RunRecord
    tails: list[LogTail] = Field(default_factory=list, max_length=100_000)


def runs_url(store_url: str) -> str | None:
    """Where a store at ``store_url`` takes run reports, or None if it is not a server."""
    if not store_url.startswith(("http://", "https://")):
        return None
    return store_url.rstrip("/") + "/v1/runs"


def tail_of(path: Path) -> str:
    """The last ``TAIL_BYTES`` of a file, from its first whole line; "" if it is unreadable."""
    try:
        # The steps can reach the run directory: a log may be a symlink to a secret or a FIFO
        # by now. Only a plain file is read, and only its end, or the report would carry it.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return ""
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - TAIL_BYTES))
            data = f.read(TAIL_BYTES)
    except OSError:
        return ""
    if size > TAIL_BYTES and b"\n" in data[:-1]:
        data = data[data.index(b"\n") + 1:]
    return data.decode(errors="replace")


def _tails(run_dir: str, jobs: list[tuple[str, list[StepRecord]]]) -> list[LogTail]:
    out = []
    for job_id, steps in jobs:
        for n, step in enumerate(steps):
            # The record names logs relative to its run directory; one that tries to leave it
            # (a hand-edited history) is not followed.
            if step.log and step.started_at and ".." not in Path(step.log).parts:
                text = tail_of(Path(run_dir) / step.log)
                if text:
                    out.append(LogTail(job=job_id, step=n, text=text))
    return out


def _body(doc: dict[str, Any], tails: list[LogTail]) -> bytes:
    return json.dumps({"record": doc, "tails": [t.model_dump() for t in tails]}).encode()


def _client(token: str | None, timeout: float) -> httpx2.Client:
    token = token if token is not None else os.environ.get("STICKYCI_TOKEN")
    headers = {"authorization": f"Bearer {token}"} if token else {}
    # A server that does not answer a connection is given less time than one that is slow.
    return httpx2.Client(headers=headers, timeout=httpx2.Timeout(timeout, connect=2.0))


def _check(response: httpx2.Response, run_id: str) -> None:
    if response.status_code >= 400:
        try:
            why = str(response.json()["error"])
        except (ValueError, KeyError, TypeError):
            why = f"HTTP {response.status_code}"
        raise StickyError(f"the server refused run {run_id}: {why}")


def push_runs(runs: list[RunRecord], store_url: str, token: str | None = None,
              say: Callable[[str], None] | None = None) -> int:
    """Send recorded runs to the server at ``store_url``; how many it took. The first refusal
    stops the push, naming the run and the server's reason."""
    url = runs_url(store_url)
    if url is None:
        raise UsageError(f"{store_url!r} is not a stickyci server; push to one: --server "
                         "http://HOST:PORT (or STICKYCI_STORE)")
    with _client(token, 30.0) as client:
        for run in runs:
            tails = _tails(run.run_dir, [(j.id, j.steps) for j in run.jobs])
            try:
                response = client.put(f"{url}/{run.id}", content=_body(run.to_dict(), tails),
                                      headers=_HEADERS)
            except httpx2.HTTPError as exc:
                raise StickyError(f"cannot reach {store_url} to push run {run.id}: "
                                  f"{exc.__class__.__name__}") from exc
            _check(response, run.id)
            if say:
                say(f"pushed run {run.id} ({run.pipeline}, {run.state})")
    return len(runs)


class Reporter:
    """Reports a run to a server as it goes: give it the executor's progress events.

    Events only take a snapshot of the record (on the event loop, where the record changes)
    and wake the sending thread, which sends the newest snapshot at most every ``interval``
    seconds; one thread sends them all, so the server gets them in order and the last one
    last. A failure to send is logged once and the run goes on; later reports still try.
    """

    def __init__(self, run: RunRecord, url: str, token: str | None = None, *,
                 interval: float = INTERVAL) -> None:
        self.run, self.url, self.interval = run, f"{url}/{run.id}", interval
        self._client = _client(token, FINAL_TIMEOUT)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._snapshot: dict[str, Any] | None = None
        self._dirty = False
        self._warned = False
        self._snap()
        self._thread = threading.Thread(target=self._loop, name="stickyci-report", daemon=True)
        self._thread.start()

    # The executor's Progress events.
    def job(self, rec: JobRecord, event: str) -> None:
        """A job started, ended or is retried."""
        self._snap()

    def step(self, rec: JobRecord, step: StepRecord) -> None:
        """A step started or ended."""
        self._snap()

    def output(self, rec: JobRecord, text: str) -> None:
        """A step wrote output: its log tail changed, the record did not."""
        with self._lock:
            self._dirty = True
        self._wake.set()

    def _snap(self) -> None:
        doc = self.run.to_dict()
        with self._lock:
            self._snapshot, self._dirty = doc, True
        self._wake.set()

    def _loop(self) -> None:
        last = -self.interval
        while True:
            self._wake.wait()
            # Throttle, unless the run is ending: close() cuts the wait short.
            self._closing.wait(last + self.interval - time.monotonic())
            self._wake.clear()
            with self._lock:
                doc, dirty, self._dirty = self._snapshot, self._dirty, False
            if dirty and doc is not None:
                self._send(doc)
                last = time.monotonic()
            if self._closing.is_set():
                with self._lock:
                    if not self._dirty:
                        return

    def _send(self, doc: dict[str, Any]) -> None:
        jobs = [(str(j["id"]), [StepRecord(**{k: s[k] for k in ("name", "log", "started_at")})
                                for s in j["steps"]]) for j in doc["jobs"]]
        try:
            _check(self._client.put(self.url, content=_body(doc, _tails(self.run.run_dir, jobs)),
                                    headers=_HEADERS), self.run.id)
        except (httpx2.HTTPError, StickyError) as exc:
            if not self._warned:
                self._warned = True
                why = str(exc) if isinstance(exc, StickyError) else exc.__class__.__name__
                log.warning("cannot report run %s to %s (%s); the run goes on, and "
                            "`stickyci runs push %s` sends it later", self.run.id,
                            self.url.rsplit("/v1/", 1)[0], why, self.run.id)

    def close(self) -> None:
        """Send the final record and stop; the end of a run waits at most ``FINAL_TIMEOUT``
        for it."""
        self._snap()
        self._closing.set()
        self._wake.set()
        self._thread.join(FINAL_TIMEOUT)
        if not self._thread.is_alive():
            self._client.close()
