"""Forked worker processes for the loops that touch every file (commit, restore).

Hashing, compressing and file I/O release the GIL, but the per-file Python around them does
not, and with tens of thousands of small files that is what serialises threads (a full commit
of a 1.2 GB, 52k-file tree: 5.0 s on threads, 3.1 s forked, on 2 cores). Workers are forked,
so they inherit whatever the caller prepared (a loaded index, a manifest) without pickling it.
"""

from __future__ import annotations

import ctypes
import itertools
import multiprocessing
import os
import queue
import signal
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from types import TracebackType
from typing import Any, Generic, TypeVar

from .errors import StickyError

T = TypeVar("T")
R = TypeVar("R")
WORKERS = (os.cpu_count() or 1) + 1  # one more than cores, to cover reads that wait on disk
# Below this much file content a fork costs more than it saves.
PARALLEL_MIN_BYTES = 64 << 20
_PR_SET_PDEATHSIG = 1
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3

_task: Callable[[Any], Any] | None = None
_abort: Any = None


def _start_worker() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    # A worker allocates and frees a buffer per file, chunk and pack. glibc hands big freed
    # blocks back to the kernel, and the next one faults in again page by page, zeroed: kept
    # instead (a worker lives for one operation), a full commit of the 1 GB benchmark tree
    # takes 45k page faults instead of 100k, its workers 0.12-0.17 s less CPU.
    if hasattr(libc, "mallopt"):  # glibc's
        libc.mallopt(_M_MMAP_THRESHOLD, 64 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 512 << 20)
    # A caller killed with SIGKILL cannot stop its workers; the kernel does it for us, so a
    # dead commit never goes on publishing packs.
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:
        os._exit(1)


def _call(item: Any) -> Any:
    assert _task is not None
    return _task(item)


def aborted() -> bool:
    """In a worker: True once another task failed; stop at the next safe point."""
    return _abort is not None and bool(_abort.is_set())


class ForkedPool(Generic[T, R]):
    """``fn`` run in forked workers on items handed over one at a time, while the caller is
    still producing them; results come back in completion order.

    Use it as a context manager. Leaving it on an error asks the tasks still running to stop
    (``aborted()``) and waits for them, so none is killed halfway through a write. A worker
    killed on its own (the out-of-memory killer) fails the pool with a ``StickyError`` rather
    than leaving its task waited for forever (what ``multiprocessing.Pool`` does); the
    executor then ends the other workers too, wherever they are, as the parent's own death
    would: a pack one was writing stays unpublished in the store's ``tmp/``, or published
    without an index, and gc sweeps either once past its grace period.
    """

    def __init__(self, fn: Callable[[T], R], workers: int = WORKERS) -> None:
        global _task, _abort
        ctx = multiprocessing.get_context("fork")
        _task, _abort = fn, ctx.Event()
        self.workers = workers
        self.running = 0  # handed over and not yet collected
        self._done: queue.SimpleQueue[Future[R]] = queue.SimpleQueue()
        # Forked on the first submit, before the executor starts its thread.
        self._pool = ProcessPoolExecutor(workers, ctx, initializer=_start_worker)

    def __enter__(self) -> ForkedPool[T, R]:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        global _task, _abort
        if exc is not None and _abort is not None:
            _abort.set()
        self._pool.shutdown(wait=True, cancel_futures=exc is not None)
        _task, _abort = None, None

    def submit(self, item: T) -> None:
        """Hand ``item`` to the next free worker."""
        self.running += 1
        self._pool.submit(_call, item).add_done_callback(self._done.put)

    def finished(self) -> list[R]:
        """The results that came in since the last call, without waiting; raises what a
        task raised."""
        out = []
        while not self._done.empty():
            out.append(self._collect())
        return out

    def next(self) -> R:
        """Wait for the next result; raises what a task raised."""
        return self._collect()

    def _collect(self) -> R:
        done = self._done.get()
        self.running -= 1
        try:
            return done.result()
        except BrokenProcessPool as exc:
            raise StickyError(
                "a stickyci worker process was killed (by the out-of-memory killer, or a "
                "signal sent to it alone), so the operation stopped unfinished; give the job "
                "more memory, or retry") from exc


def forked_map(fn: Callable[[T], R], items: Sequence[T], workers: int = WORKERS) -> Iterator[R]:
    """Yield ``fn(item)`` for every item, in completion order, computed in forked workers.

    When a task raises, the others are asked to stop (``aborted()``) and are waited for, so
    none is killed halfway through a write; then the error is raised here.
    """
    with ForkedPool(fn, min(workers, max(1, len(items)))) as pool:
        for item in items:
            pool.submit(item)
        while pool.running:
            yield pool.next()


def forked_runs(items: Sequence[T], run: Callable[[Iterable[T]], None],
                workers: int = WORKERS) -> None:
    """Call ``run`` on contiguous runs of ``items`` in forked workers (several runs per
    worker, so one slow run does not leave the others idle). The items a run is handed stop
    coming once another run failed; the first error is raised here."""
    step = max(1, len(items) // (workers * 8))
    runs = [items[i : i + step] for i in range(0, len(items), step)]

    def each(i: int) -> None:
        run(itertools.takewhile(lambda _: not aborted(), runs[i]))

    for _ in forked_map(each, range(len(runs)), workers):
        pass
