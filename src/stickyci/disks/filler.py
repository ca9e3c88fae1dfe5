"""The filler of a lazy base: file content fetched from the store when a file is first read.

A lazy base is a skeleton (directories, links, metadata, files as sparse placeholders of the
right size) whose placeholders carry a fanotify ``FAN_PRE_ACCESS`` inode mark. A read of one,
direct or through the overlay above it, blocks in the kernel until the filler answers: it
writes the file's chunks (each verified by the object store), puts back the file's mtime,
removes the mark and allows the read. A chunk that fails to verify or a store that is down
denies the read with EIO and logs a line naming the object: a reader never sees the holes.
A prefetch thread fills the other files in pack order; when every file is filled, the base
is published as an ordinary base and the filler exits.

The overlay reads its lower layer through a read-only private mount, so an event's fd cannot
be written. The skeleton hands the filler the fds it created the placeholders with: the kernel
decides at open whether a file raises pre-content events, and these were opened before their
inode was marked, so writes through them raise none (a fill costs the reader's event only, a
prefetch none). A file without one (a worker restarted, a tree with more files than fds) is
opened by the filler, and the events its own open and writes raise are allowed by the loop.

The kernel allows every pending event when the last fd of a group closes, and a dead mark
raises no event: a lost group would let readers see holes. So two processes hold the group:
a *guardian*, which does nothing but wait, and the *worker* it forks. A worker killed (even
by SIGKILL) is replaced; its successor first denies with EIO the events the dead one had
read but not answered (the kernel matches an answer by fd number only), so those readers
fail instead of hanging, and everything else is served as before. A worker that keeps dying
leaves the guardian denying every read with EIO until the mount goes away.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import queue
import resource
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import codec, fanotify
from ..digest import Digest
from ..errors import StickyError
from ..fsutil import Opener, Tree
from ..snapshot import FILE, Content, Entry, Manifest
from ..store import Location, ObjectStore, open_backend

log = logging.getLogger("stickyci")
# Reads raise FAN_PRE_ACCESS; a mapping made through the overlay raises none (its backing
# file is mapped without one), so a file is also filled when it is opened.
MASK = fanotify.FAN_PRE_ACCESS | fanotify.FAN_OPEN_PERM
PID_FILE = "filler.pid"
STATUS_FILE = "filler.json"
LOG_FILE = "filler.log"
MAX_RESTARTS = 5
# "0": fill only what is read (the base is then never complete, so never published).
PREFETCH_ENV = "STICKYCI_LAZY_PREFETCH"
_SWEEP_MAX_FD = 1 << 16
MAX_KEPT = 1 << 17  # placeholder fds a skeleton may hand over (kernel memory: ~1 KiB each)
_STATUS_EVERY = 0.25
_WRITE_BATCH = 8 << 20
Work = Callable[[int], int]  # a worker's life, given its guardian's pid; its exit code


@dataclass(slots=True)
class Status:
    """How far a lazy base is: files and bytes filled on demand and by the prefetch."""

    files: int = 0
    bytes: int = 0
    on_demand_files: int = 0
    on_demand_bytes: int = 0
    prefetched_files: int = 0
    prefetched_bytes: int = 0
    errors: int = 0
    restarts: int = 0
    own_events: int = 0  # raised by the filler's own opens and writes (none through kept fds)
    prefetch: bool = True  # False: only what is read is filled, so the base never completes
    done: bool = False

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)


def read_status(sdir: Path) -> Status | None:
    """The last status the filler of the mount with private dir ``sdir`` wrote, if any."""
    try:
        doc = json.loads((sdir / STATUS_FILE).read_text())
        return Status(**{k: v for k, v in doc.items() if k in Status.__slots__})
    except (OSError, ValueError, TypeError):
        return None


def _write_status(sdir: Path, status: Status) -> None:
    tmp = sdir / f".{STATUS_FILE}.tmp"
    tmp.write_text(json.dumps(status.as_dict()))
    os.replace(tmp, sdir / STATUS_FILE)


def _start_time(pid: int) -> str:
    """The kernel's start time of ``pid`` (field 22 of its stat), so a reused pid is told
    apart; "" for a zombie (an exited daemon its reaper has not waited for yet)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return "" if fields[0] == "Z" else fields[19]


def _write_pid(sdir: Path) -> int:
    """Record this process as the mount's guardian; its pid."""
    pid = os.getpid()
    tmp = sdir / f".{PID_FILE}.tmp"
    tmp.write_text(f"{pid} {_start_time(pid)}\n")
    os.replace(tmp, sdir / PID_FILE)
    return pid


def guardian_pid(sdir: Path) -> int | None:
    """The pid of the mount's live guardian, or None if it has exited (or never started)."""
    try:
        pid_text, started = (sdir / PID_FILE).read_text().split()
        pid = int(pid_text)
        return pid if _start_time(pid) == started else None
    except (OSError, ValueError, IndexError):
        return None


class _Files:
    """The files of a manifest still to fill, by path; hard links resolve to their leader."""

    def __init__(self, manifest: Manifest, root: str) -> None:
        self.root = root.rstrip("/") + "/"
        leaders: dict[int, Entry] = {}
        self.by_path: dict[str, Entry] = {}
        for e in manifest.sorted_entries():
            if e.kind != FILE or not e.size:
                continue
            if e.link:
                e = leaders.setdefault(e.link, e)
            self.by_path.setdefault(e.path, e)
        for e in manifest.entries.values():
            if e.kind == FILE and e.link in leaders:
                self.by_path[e.path] = leaders[e.link]
        self.leaders = list({id(e): e for e in self.by_path.values()}.values())
        self.filled: set[str] = set()

    def of_fd(self, fd: int) -> Entry | None:
        """The entry of the file open as ``fd`` (an event's), or None if it is not one of
        this tree's.

        The kernel names the file by its path in the mount it was opened through: under
        ``root`` for a direct reader, relative to the lower dir (as ``/rel``) for a read
        through the overlay, whose private clone of the lower mount is rooted there. Either
        way the inode must be the one at that path in ``root``.
        """
        path = os.readlink(f"/proc/self/fd/{fd}")
        rel = path[len(self.root):] if path.startswith(self.root) else path.lstrip("/")
        entry = self.by_path.get(rel)
        if entry is None:
            return None
        st, mine = os.fstat(fd), os.lstat(self.root + rel)
        return entry if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino) else None


class _Worker:
    """Answers the group's events, fills files (a fill thread for readers, a prefetch
    thread for the rest) and replaces a dead guardian.

    ``kept`` holds the skeleton's fds of the files not filled yet (by path), whose writes
    raise no event: the event loop fills those files itself. Another file is opened here, and
    that open and its writes raise events (the inode is still marked): the loop hands its
    reader's event to the fill thread and allows the filler's own events at once, so it never
    waits on itself.
    """

    def __init__(self, group: int, root: Path, manifest: Manifest, store_url: str,
                 sdir: Path, publish: Callable[[], None], kept: dict[str, int]) -> None:
        self.group, self.root, self.sdir, self.publish = group, root, sdir, publish
        self.kept = kept
        self.files = _Files(manifest, str(root))
        self.objects = ObjectStore(open_backend(store_url), load_index=False)
        self.status = read_status(sdir) or Status()
        self.status.files = len(self.files.leaders)
        self.status.bytes = sum(e.size for e in self.files.leaders)
        self.status.prefetch = os.environ.get(PREFETCH_ENV, "1") != "0"
        self.stop = threading.Event()
        self.prefetch_done = threading.Event()
        self.prefetch_ok = True
        self.readers: queue.SimpleQueue[fanotify.Event] = queue.SimpleQueue()
        self.lock = threading.Lock()  # the status and the per-file locks
        self.readers_of = threading.local()  # each thread's Content (it keeps a bundle)
        self.filling: dict[str, threading.Lock] = {}
        self._saved = 0.0

    def run(self, guardian: int, work: Work) -> int:
        """Serve until every file is filled (then publish) or until asked to stop."""
        with Opener(Tree.at(self.root)) as op:
            return self._run(op, guardian, work)

    def _run(self, op: Opener, guardian: int, work: Work) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        threading.Thread(target=self._serve_readers, daemon=True).start()
        if self.status.prefetch:
            threading.Thread(target=self._prefetch, daemon=True).start()
        me = os.getpid()
        poll = select.poll()
        poll.register(self.group, select.POLLIN)
        watch = _pidfd(guardian)
        if watch is not None:
            poll.register(watch, select.POLLIN)
        checked = 0.0
        while not self.stop.is_set():
            ready = {fd for fd, _ in poll.poll(200)}
            if watch is None or watch in ready:
                # Alone with the group: another holder, before anything can go wrong here.
                if watch is not None:
                    poll.unregister(watch)
                    os.close(watch)
                watch = _spawn_guardian(self.group, work, self.root, self.sdir, self.kept)
                if watch is not None:
                    poll.register(watch, select.POLLIN)
            if self.group in ready:
                for event in fanotify.read_events(self.group):
                    if event.fd == fanotify.FAN_NOFD:
                        continue
                    if event.pid == me:
                        self._reply(event.fd, True)  # the filler's own write
                        os.close(event.fd)
                        with self.lock:
                            self.status.own_events += 1
                    else:
                        self._answer(op, event, here=True)
            now = time.monotonic()
            if now - checked > _STATUS_EVERY:
                checked = now
                if not self.root.is_dir():
                    return 0  # moved away by an unmount, or deleted: nothing left to guard
                self._save()
            if self.prefetch_done.is_set() and self.prefetch_ok:
                self.status.done = True
                self._save(force=True)
                self.publish()
                return 0
        self._save(force=True)
        return 0

    def _serve_readers(self) -> None:
        with Opener(Tree.at(self.root)) as op:
            while True:
                self._answer(op, self.readers.get())

    def _answer(self, op: Opener, event: fanotify.Event, here: bool = False) -> None:
        """Fill the file of a reader's event and allow it (deny it with EIO if the fill
        fails). From the event loop (``here``) only a fill that raises no event of ours, so
        the loop never waits on itself: another goes to the fill thread."""
        entry = None
        handed = False
        try:
            entry = self.files.of_fd(event.fd)
            if entry is None:
                # Not a file of this tree (the base was moved or removed): no content to give.
                self._reply(event.fd, False)
                return
            if here and entry.path not in self.kept and entry.path not in self.files.filled:
                self.readers.put(event)
                handed = True
                return
            self._fill(op, entry, on_demand=True)
            self._reply(event.fd, True)
        except (StickyError, OSError) as exc:
            with self.lock:
                self.status.errors += 1
            log.error("lazy fill failed, the reader of %s gets EIO: %s",
                      entry.path if entry else "?", exc)
            self._reply(event.fd, False)
        finally:
            if not handed:
                os.close(event.fd)

    def _reply(self, fd: int, allow: bool) -> None:
        # ENOENT: the reader was killed while it waited; there is nobody to answer.
        with contextlib.suppress(FileNotFoundError):
            fanotify.respond(self.group, fd, allow, errno.EIO)

    def _fill(self, op: Opener, e: Entry, *, on_demand: bool) -> None:
        """Write the file's chunks, each verified, unless it is filled already."""
        with self.lock:
            lock = self.filling.setdefault(e.path, threading.Lock())
        with lock:
            if e.path in self.files.filled:
                return
            fd = self.kept.pop(e.path, None)
            quiet = fd is not None
            if fd is None:
                fd = op.open(e.path, os.O_WRONLY)
            filled = False
            try:
                self._write(e, fd, whole_pack=not on_demand)
                # Writing moved the mtime; the base must show the manifest's.
                os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
                fanotify.unmark(self.group, fd, MASK)
                filled = True
            finally:
                if quiet and not filled:
                    self.kept[e.path] = fd  # the next try writes through it again
                else:
                    os.close(fd)
            self.files.filled.add(e.path)
        with self.lock:
            self.filling.pop(e.path, None)
            if on_demand:
                self.status.on_demand_files += 1
                self.status.on_demand_bytes += e.size
            else:
                self.status.prefetched_files += 1
                self.status.prefetched_bytes += e.size

    def _write(self, e: Entry, fd: int, whole_pack: bool) -> None:
        offset, batch = 0, bytearray()
        for digest, length, data in self._chunks(e, whole_pack):
            if len(data) != length:
                raise StickyError(f"object {digest} of {e.path} has {len(data)} bytes, its "
                                  f"manifest entry says {length}")
            batch += data
            # Few large writes: each raises an event the loop must allow.
            if len(batch) >= _WRITE_BATCH:
                offset = _pwrite_all(fd, batch, offset)
                batch.clear()
        offset = _pwrite_all(fd, batch, offset)
        if offset != e.size:
            raise StickyError(f"the chunks of {e.path} hold {offset} bytes, not {e.size}")

    def _chunks(self, e: Entry, whole_pack: bool) -> Iterator[tuple[Digest, int, bytes]]:
        """The file's chunks, each verified (a bundle's slice: the bundle), with its
        manifest length.

        The prefetch reads whole packs (it goes through them in order). A reader waits on
        its file only: its chunks are read by ranges, one read per run of chunks stored side
        by side in a pack, not the packs around them.
        """
        if any(len(ref) == 3 for ref in e.chunks):
            # A small file's slice of a bundle: the files of a bundle come in a row in the
            # prefetch, and a reader of one often reads its neighbours next.
            content = self._content(whole_pack)
            for ref in e.chunks:
                try:
                    piece = bytes(content.read(ref, e.path))
                except StickyError as exc:
                    raise StickyError(f"object {ref[0]} of {e.path}: {exc}") from exc
                yield Digest(bytes.fromhex(ref[0])), ref[1], piece
            return
        digests = [(Digest(bytes.fromhex(ref[0])), ref[1]) for ref in e.chunks]
        chunks = [(d, length, self.objects.locate(d)) for d, length in digests]
        for run in ([[c] for c in chunks] if whole_pack else _runs(chunks)):
            span, start = b"", 0
            if len(run) > 1:
                first, last = run[0][2], run[-1][2]
                assert first is not None and last is not None  # _runs: located, side by side
                start = first.offset
                with contextlib.suppress(StickyError):
                    span = self.objects.backend.get(first.pack, start,
                                                    last.offset + last.length - start)
            for digest, length, loc in run:
                data = None
                if span and loc:
                    with contextlib.suppress(StickyError):
                        data = codec.decode(memoryview(span)[loc.offset - start:
                                                             loc.offset - start + loc.length],
                                            digest)
                try:
                    # Alone, or when the run's read failed: the object store's own read,
                    # which looks again at an index that was wrong.
                    got = data if data is not None else self.objects.get(digest,
                                                                         whole_pack=whole_pack)
                except StickyError as exc:
                    raise StickyError(f"object {digest} of {e.path}: {exc}") from exc
                yield digest, length, got

    def _content(self, whole_pack: bool) -> Content:
        """This thread's reader of bundles, which keeps the last one it decoded."""
        name = "whole_packs" if whole_pack else "ranges"
        content: Content | None = getattr(self.readers_of, name, None)
        if content is None:
            content = Content(self.objects, whole_pack=whole_pack)
            setattr(self.readers_of, name, content)
        return content

    def _prefetch(self) -> None:
        """Fill every file in pack order, so each pack is read once, front to back."""
        def where(e: Entry) -> tuple[str, int]:
            loc = self.objects.locate(Digest(bytes.fromhex(e.chunks[0][0])))
            return (loc.pack, loc.offset) if loc else ("", 0)

        try:
            self.objects.refresh()
            order = sorted(self.files.leaders, key=where)
            with Opener(Tree.at(self.root)) as op:
                for e in order:
                    if self.stop.is_set():
                        return
                    try:
                        self._fill(op, e, on_demand=False)
                    except (StickyError, OSError) as exc:
                        self.prefetch_ok = False  # a reader will try again, and get EIO
                        log.error("lazy prefetch of %s failed: %s", e.path, exc)
        except (StickyError, OSError) as exc:
            self.prefetch_ok = False
            log.error("lazy prefetch stopped: %s", exc)
        finally:
            self.prefetch_done.set()

    def _save(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._saved > _STATUS_EVERY:
            self._saved = now
            with self.lock:
                doc = self.status.as_dict()
            with contextlib.suppress(OSError):
                _write_status(self.sdir, Status(**doc))


_Located = tuple[Digest, int, Location | None]


def _runs(chunks: list[_Located]) -> Iterator[list[_Located]]:
    """The chunks in runs stored back to back in one pack (a chunk not located: alone)."""
    run: list[_Located] = []
    end: tuple[str, int] | None = None
    for chunk in chunks:
        loc = chunk[2]
        if run and (loc is None or (loc.pack, loc.offset) != end):
            yield run
            run = []
        run.append(chunk)
        end = (loc.pack, loc.offset + loc.length) if loc else None
        if loc is None:
            yield run
            run = []
    if run:
        yield run


def _pwrite_all(fd: int, data: bytes | bytearray, offset: int) -> int:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
    return offset


def _sweep(group: int) -> None:
    """Deny, by fd number, events a killed worker read and never answered."""
    # Its fds numbered up to its limit: the skeleton raised it to hold the placeholders' fds.
    limit = min(resource.getrlimit(resource.RLIMIT_NOFILE)[0], _SWEEP_MAX_FD + MAX_KEPT)
    released = sum(fanotify.answer_stale(group, fd) for fd in range(limit))
    if released:
        log.warning("lazy filler: %d read(s) left waiting by the killed worker got EIO",
                    released)


def _deny_all(group: int, stop: threading.Event) -> None:
    """Keep the group and refuse every read until stopped: holes must never be read."""
    poll = select.poll()
    poll.register(group, select.POLLIN)
    while not stop.is_set():
        if poll.poll(200):
            for event in fanotify.read_events(group):
                if event.fd != fanotify.FAN_NOFD:
                    fanotify.respond(group, event.fd, False, errno.EIO)
                    os.close(event.fd)


def _pidfd(pid: int) -> int | None:
    """A pidfd of ``pid`` (readable once it exits), or None if it is gone already."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def _wait_exit(pid: int) -> None:
    """Wait for ``pid`` to exit, whether or not it is our child; reap it if it is."""
    fd = _pidfd(pid)
    if fd is not None:
        try:
            poll = select.poll()  # not select(): the fd may be above 1023
            poll.register(fd, select.POLLIN)
            poll.poll()
        finally:
            os.close(fd)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _spawn_guardian(group: int, work: Work, root: Path, sdir: Path,
                    kept: dict[str, int]) -> int | None:
    """Fork a new guardian of this worker (the old one died); a pidfd of it."""
    log.warning("lazy filler guardian died; starting another")
    worker = os.getpid()
    child = os.fork()
    if child == 0:
        try:
            _release(kept)
            _guard(group, work, root, sdir, worker)
        except BaseException:
            log.exception("lazy filler guardian failed")
        finally:
            os._exit(0)
    return _pidfd(child)


def _release(kept: dict[str, int]) -> None:
    """Close the placeholder fds of ``kept``: only the worker that fills may hold one (a
    writable fd makes an exec of the file fail with ETXTBSY)."""
    for fd in kept.values():
        os.close(fd)
    kept.clear()


def _guard(group: int, work: Work, root: Path, sdir: Path, worker: int = 0,
           kept: dict[str, int] | None = None) -> None:
    """Hold the group, run workers (or watch ``worker``) until one has filled everything or
    the mount stops us (or its base is gone), and replace those that die. The first worker
    started here takes ``kept`` (the skeleton's placeholder fds) with it."""
    pid = _write_pid(sdir)
    stop = threading.Event()
    current = [worker]

    def on_term(*_: Any) -> None:
        stop.set()
        if current[0]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(current[0], signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    restarts = (read_status(sdir) or Status()).restarts
    while not stop.is_set():
        if not current[0]:
            child = os.fork()
            if child == 0:
                code = 1
                try:
                    if restarts:
                        _sweep(group)
                    code = work(pid)
                except BaseException:
                    log.exception("lazy filler worker failed")
                finally:
                    os._exit(code)
            current[0] = child
            if kept:
                _release(kept)
        _wait_exit(current[0])
        current[0] = 0
        st = read_status(sdir) or Status()
        if stop.is_set() or st.done or not root.is_dir():
            return
        restarts += 1
        st.restarts = restarts
        with contextlib.suppress(OSError):
            _write_status(sdir, st)
        log.warning("lazy filler worker died; restart %d of %d", restarts, MAX_RESTARTS)
        if restarts >= MAX_RESTARTS:
            log.error("lazy filler: giving up; every read of an unfilled file gets EIO")
            _deny_all(group, stop)
            return


def start(group: int, root: Path, manifest: Manifest, store_url: str, sdir: Path,
          publish: Callable[[], None], kept: dict[str, int] | None = None) -> int:
    """Start the filler of the lazy base ``root`` as a daemon holding ``group``; its pid.

    ``kept``: writable fds of placeholders (by path) opened before their inode was marked,
    which the filler writes through without raising events; the daemon takes copies, the
    caller still closes its own.
    The daemon is detached (its own session, stdio on /dev/null, log in ``sdir``), keeps no
    other fd of the caller's (a pipe it kept open would hang whoever reads the caller's
    output), and records its pid in ``sdir`` for :func:`stop`.
    """
    kept = dict(kept or {})
    sdir.mkdir(parents=True, exist_ok=True)
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        code = 1
        try:
            os.close(r)
            os.setsid()
            if os.fork() == 0:
                _daemonize(keep={group, w, *kept.values()}, log_path=sdir / LOG_FILE)
                _write_pid(sdir)  # before the mount returns, which then finds it
                os.write(w, b"%d" % os.getpid())
                os.close(w)

                def work(guardian: int) -> int:
                    # A restarted worker gets none: its guardian let them go.
                    worker = _Worker(group, root, manifest, store_url, sdir, publish, kept)
                    return worker.run(guardian, work)

                _guard(group, work, root, sdir, kept=kept)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    os.waitpid(child, 0)
    with os.fdopen(r, "rb") as f:
        text = f.read()
    if not text:
        raise StickyError(f"the lazy filler for {root} did not start; see {sdir / LOG_FILE}")
    return int(text)


def _daemonize(keep: set[int], log_path: Path) -> None:
    os.chdir("/")  # a cwd inside some mount would hold it busy for as long as the filler runs
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    root = logging.getLogger()
    for h in [*root.handlers, *log.handlers]:
        root.removeHandler(h)
        log.removeHandler(h)
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def stop(sdir: Path, timeout: float = 10.0) -> None:
    """Stop the filler of a mount and wait for it; the prefetch ends after its current file."""
    pid = guardian_pid(sdir)
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while guardian_pid(sdir) is not None:
        if time.monotonic() > deadline:
            log.warning("the lazy filler (pid %d) did not stop in %.0fs; killing it", pid,
                        timeout)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.01)
