"""``stickyci serve --workers N``: N processes answering on one address, and the supervisor
that starts them, keeps what they must share, restarts one that dies and stops them all on
SIGTERM.

Each worker listens on a socket of its own, all bound to the address with ``SO_REUSEPORT``, so
the kernel spreads connections evenly over them (on one shared socket, whichever worker woke
first took every waiting connection); the supervisor keeps every socket open, so connections
to a worker that died wait in its backlog for its successor. A worker is a whole server
(``create_app``) told what it shares (``shared.py``):

- the cache accounting of ``--max-size``: one ``CacheLRU`` here, in the supervisor, fed every
  hit, upload and disappearance by every worker through a pipe each, applied in the order they
  happened across the workers, so the eviction order is the whole server's; the supervisor
  evicts (deletes the oldest entries and counts them), so two workers never each evict by
  their own partial view;
- the metrics: prometheus_client's multiprocess mode (set up here before anything imports it),
  so ``/metrics`` through any worker is the sum over all of them and the supervisor;
- changes to state a worker caches (refs, GitHub Actions cache entries): counters in shared
  memory (``Changes``);
- tokens need nothing: every worker checks ``tokens.json`` on every request.

What runs once per server (disk eviction and gc, the store's size in the history) runs in
worker 0; each worker adds its own cache use to the history, which sums them.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import deque
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

from ..errors import StickyError
from .shared import TOUCH, Change, Changes, Shared, decode

if TYPE_CHECKING:
    import uvicorn
    from starlette.types import ASGIApp

    from .config import ServerConfig
    from .history import Sampler
    from .lru import CacheLRU

log = logging.getLogger("stickyci.server")

MAX_WORKERS = 64
RESTARTS = 5
"""This many deaths of workers within ``RESTART_WINDOW`` seconds stop the server (a worker
that cannot start, say): each one before is restarted."""
RESTART_WINDOW = 60.0
STOP_TIMEOUT = 15.0
"""Seconds a worker has to finish its requests after SIGTERM (uvicorn allows 5) before it is
killed."""
BACKLOG = 2048
_PR_SET_PDEATHSIG = 1
_METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"  # metrics.MULTIPROCESS_DIR, not imported yet here
_STAGING = "gha-uploads"  # gha.cache's staging directory, cleaned once for all workers


def serve(cfg: ServerConfig, socks: list[socket.socket], access_log: bool) -> None:
    """Serve with a worker process per socket of ``socks`` (bound to one address with
    ``SO_REUSEPORT``) until SIGTERM or SIGINT; a worker that keeps dying stops the server
    with a ``StickyError`` naming it."""
    if "prometheus_client" in sys.modules and _METRICS_ENV not in os.environ:
        raise RuntimeError("serve --workers: prometheus_client was imported before its "
                           "multiprocess mode was set up")
    metrics_dir = tempfile.mkdtemp(prefix="stickyci-metrics-")
    os.environ[_METRICS_ENV] = metrics_dir
    try:
        Supervisor(cfg, socks, access_log).run()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


class Supervisor:
    """The workers' parent: starts, watches, restarts and stops them, and keeps the cache
    accounting they share."""

    def __init__(self, cfg: ServerConfig, socks: list[socket.socket], access_log: bool) -> None:
        from ..store import open_backend
        from .history import HISTORY_DB, History, Sampler
        from .lru import CacheLRU
        from .metrics import Metrics

        self.cfg = cfg
        self.socks = socks  # a worker's own; kept open here while it restarts
        self.n = len(socks)
        self.access_log = access_log
        self.ctx = multiprocessing.get_context("spawn")
        self.counters = self.ctx.RawArray("q", len(Change))
        self.counters_lock = self.ctx.Lock()
        self.procs: list[BaseProcess | None] = [None] * self.n
        self.deaths: deque[float] = deque()
        self.stopping = False
        self.backend = open_backend(cfg.store_url)  # a bad store fails here, in one line
        self.metrics = Metrics()
        self.lru: CacheLRU | None = CacheLRU(cfg.max_size) if cfg.max_size else None
        # The evictions counted here go into the history as the workers' own uses do.
        self.sampler: Sampler | None = (
            Sampler(History(cfg.state_dir / HISTORY_DB), self.metrics) if self.lru else None)
        self._done = threading.Event()
        self._threads: list[threading.Thread] = []
        self._links: list[Connection] = []  # the reading ends of the workers' pipes
        self._links_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)

    def run(self) -> None:
        """Start the workers and watch them until told to stop."""
        shutil.rmtree(self.cfg.state_dir / _STAGING, ignore_errors=True)
        for sock in self.socks:
            sock.listen(BACKLOG)  # connections wait in the backlog while a worker starts
        if self.lru is not None:
            self._thread(self._seed)
            self._thread(self._account)
            self._thread(self._sample_loop)
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        old = {sig: signal.signal(sig, self._stop) for sig in
               (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        old_fd = signal.set_wakeup_fd(wake_w)
        try:
            for i in range(self.n):
                self._start(i)
            while not self.stopping:
                sentinels = {p.sentinel: i for i, p in enumerate(self.procs) if p is not None}
                ready = wait([*sentinels, wake_r])
                if wake_r in ready:
                    with contextlib.suppress(BlockingIOError):
                        os.read(wake_r, 512)
                for fd in ready:
                    if isinstance(fd, int) and fd in sentinels and not self.stopping:
                        self._restart(sentinels[fd])
        finally:
            signal.set_wakeup_fd(old_fd)
            for sig, handler in old.items():
                signal.signal(sig, handler)
            self._stop_all()
            os.close(wake_r)
            os.close(wake_w)
            self._done.set()
            self._wake()
            for t in self._threads:
                t.join(STOP_TIMEOUT)
            self._sample()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _stop(self, signum: int, _frame: object) -> None:
        self.stopping = True

    def _start(self, index: int) -> None:
        conn = None
        if self.lru is not None:
            mine, conn = self.ctx.Pipe(duplex=False)
            with self._links_lock:
                self._links.append(mine)
            self._wake()  # the accounting thread waits on the new link too
        proc = self.ctx.Process(
            target=_worker, name=f"stickyci-worker-{index}",
            args=(self.cfg, self.socks[index], index, self.counters, self.counters_lock, conn,
                  self.access_log, os.getpid()))
        proc.start()
        if conn is not None:
            conn.close()  # the worker holds the writing end: its death is our EOF
        self.procs[index] = proc

    def _restart(self, index: int) -> None:
        proc = self.procs[index]
        assert proc is not None
        proc.join()
        now = time.monotonic()
        self.deaths.append(now)
        while self.deaths and now - self.deaths[0] > RESTART_WINDOW:
            self.deaths.popleft()
        if len(self.deaths) >= RESTARTS:
            raise StickyError(
                f"worker {index} exited with code {proc.exitcode}, the {len(self.deaths)}th "
                f"worker to die within {RESTART_WINDOW:g}s; the server stops (the workers' "
                "errors are logged above)")
        log.warning("worker %d (pid %s) exited with code %s; starting it again", index,
                    proc.pid, proc.exitcode)
        self._start(index)

    def _stop_all(self) -> None:
        live = [p for p in self.procs if p is not None and p.is_alive()]
        for p in live:
            p.terminate()  # uvicorn finishes the requests under way, then exits
        deadline = time.monotonic() + STOP_TIMEOUT
        for p in live:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()

    # -- the cache accounting of --max-size ------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # full: it is woken already
            os.write(self._wake_w, b"!")

    def _thread(self, fn: Any) -> None:
        t = threading.Thread(target=fn, daemon=True, name=f"stickyci-{fn.__name__}")
        t.start()
        self._threads.append(t)

    def _seed(self) -> None:
        assert self.lru is not None
        try:
            self.lru.seed(self.backend)
            self._evict()
        except StickyError as exc:
            log.warning("reading the cache's entries for --max-size failed: %s", exc)

    def _account(self) -> None:
        """Every worker's hits, uploads and disappearances, each worker's in its order, until
        the server stops.

        One thread reads them all, and before it evicts it takes in everything every worker
        has sent: a hit a worker answered before another worker's upload went over the limit
        is counted before the victims are chosen, whichever pipe it came through.
        """
        while not self._done.is_set():
            with self._links_lock:
                links = list(self._links)
            ready = wait([*links, self._wake_r])
            if self._wake_r in ready:
                os.read(self._wake_r, 512)
            if self._drain(links):
                self._evict()

    def _drain(self, links: list[Connection]) -> bool:
        """Take in every message waiting on ``links``, in the order they happened across the
        workers; whether any was an upload or a hit."""
        assert self.lru is not None
        waiting = []
        for conn in links:
            try:
                while conn.poll():
                    waiting.append(decode(conn.recv_bytes()))
            except (EOFError, OSError):  # its worker exited: what it sent was taken in
                with self._links_lock:
                    self._links.remove(conn)
                conn.close()
        waiting.sort(key=lambda m: m[0])
        for _, kind, name, size in waiting:
            if kind == TOUCH:
                self.lru.touch(name, size)
            else:
                self.lru.forget(name)
        return any(m[1] == TOUCH for m in waiting)

    def _evict(self) -> None:
        assert self.lru is not None
        for name in self.lru.over():  # claimed: each victim is evicted once
            try:
                self.backend.delete(name)
            except StickyError as exc:
                log.warning("evicting %s failed: %s", name, exc)
                continue
            self.metrics.child(self.metrics.evictions, name.partition("/")[0]).inc()

    def _sample_loop(self) -> None:
        from .history import SAMPLE_EVERY

        while not self._done.wait(SAMPLE_EVERY - time.time() % SAMPLE_EVERY + 0.5):
            self._sample(time.time() - 1)

    def _sample(self, now: float | None = None) -> None:
        """What the supervisor evicted since the last sample, into the history."""
        if self.sampler is None:
            return
        try:
            self.sampler.sample(now or time.time())
        except StickyError as exc:
            log.warning("sampling the server's history failed: %s", exc)


def _worker(cfg: ServerConfig, sock: socket.socket, index: int, counters: Any,
            counters_lock: Any, conn: Connection | None, access_log: bool,
            parent: int) -> None:
    """One worker process: a whole server on its socket."""
    from .app import create_app
    from .metrics import configure_logs

    # A supervisor killed with SIGKILL cannot stop its workers: the kernel does.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(1)
    configure_logs(access_log)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"stickyci: worker {index}: %(message)s"))
    logging.getLogger("stickyci").handlers[:] = [handler]
    app = create_app(cfg, shared=Shared(index, Changes(counters, counters_lock), conn))
    http_server(app).run(sockets=[sock])


def http_server(app: ASGIApp) -> uvicorn.Server:
    """The ``uvicorn.Server`` every process of ``stickyci serve`` runs its app in."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(
        app, access_log=False, log_level="warning", http="httptools", loop="uvloop",
        timeout_graceful_shutdown=5))


def check_workers(n: int) -> int:
    """``--workers N`` if sensible."""
    if not 1 <= n <= MAX_WORKERS:
        from ..errors import UsageError

        raise UsageError(f"--workers {n}: use 1 to {MAX_WORKERS} (about one per core the "
                         "server may use)")
    return n

