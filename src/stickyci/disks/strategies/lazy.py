"""The lazy strategy: an overlay over a base whose file content arrives when first read.

A cold mount (the snapshot's base is not cached here) builds the base's skeleton from the
manifest alone, with the restore's own safety rules (``materialize``: fd-relative, no symlink
followed, owners and special bits only when trusted): directories, symlinks, hard links,
modes and mtimes, and every file a sparse placeholder of its size carrying a fanotify
pre-content mark. A filler daemon (:mod:`..filler`) fills files on first read and prefetches
the rest, writing through the fds the skeleton created the placeholders with (opened before
the marks, so its writes raise no events); the overlay above it is the one of
:mod:`.overlay`, so a commit reads only the upper dir. Where pre-content events are missing
(an older kernel, a filesystem without them, no root) :func:`lazy_base` says so in one line
and the mount restores eagerly.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import resource
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ... import fanotify
from ...digest import Digest
from ...errors import StickyError
from ...fsutil import Tree, remove_tree
from ...snapshot import ContentFill, Entry, Manifest, Scan, load_manifest, materialize
from ...store import ObjectStore
from .. import basecache, filler, mounts
from .overlay import Overlay

log = logging.getLogger("stickyci")
LAZY_FILE = "lazy.json"
_UNSUPPORTED = frozenset({errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM, errno.ENOSYS,
                          errno.EXDEV, errno.ENODEV})


class Lazy(Overlay):
    """overlayfs over a lazily filled base; the filler lives as long as the mount."""

    name = "lazy"

    def mount(self, base: Path, path: Path, sdir: Path, manifest: Callable[[], Manifest],
              trust_owners: bool) -> None:
        """Mount the overlay; if that fails, stop the filler and drop the lazy base."""
        try:
            super().mount(base, path, sdir, manifest, trust_owners)
        except BaseException:
            discard(sdir)
            raise

    def unmount(self, path: Path, sdir: Path) -> None:
        """Unmount the overlay, then stop the filler and drop the base unless it is complete."""
        super().unmount(path, sdir)
        discard(sdir)

    def changes(self, path: Path, sdir: Path, base: Manifest, trust_owners: bool,
                fill: ContentFill | None = None) -> tuple[Scan, Tree]:
        """The overlay's changes, if the filler guarded the base all along."""
        if is_lazy(sdir):
            status = filler.read_status(sdir)
            if not (status and status.done) and filler.guardian_pid(sdir) is None:
                raise StickyError(
                    f"the lazy filler of {path} stopped before its base was complete, so what "
                    f"was read there since cannot be trusted; see {sdir / filler.LOG_FILE}, "
                    f"then `stickyci disk unmount {path}` and mount it again")
        return super().changes(path, sdir, base, trust_owners, fill)


def lazy_status(sdir: Path) -> dict[str, Any]:
    """What the filler of a lazy mount fetched (on demand, prefetched); {} for other mounts."""
    status = filler.read_status(sdir) if is_lazy(sdir) else None
    return status.as_dict() if status else {}


def lazy_mounts(key: str, store_url: str) -> list[dict[str, Any]]:
    """The lazy mounts of disk ``key`` from ``store_url`` on this machine: each one's path and
    what its filler fetched (on demand, prefetched, whether the base is complete)."""
    return [{"path": m.path, **lazy_status(m.dir)} for m in mounts.all_mounts()
            if m.key == key and m.store == store_url and is_lazy(m.dir)]


def is_lazy(sdir: Path) -> bool:
    """True if the mount with private dir ``sdir`` was given a lazy base."""
    return (sdir / LAZY_FILE).is_file()


def _notice(why: str) -> None:
    log.warning("lazy mount not available here (%s); restoring the whole base instead", why)


def _probe(group: int, root: Path) -> OSError | None:
    """Mark a scratch file under ``root``: the error if this filesystem refuses the mark."""
    probe = root / ".probe"
    fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        fanotify.mark(group, fd, filler.MASK)
        fanotify.unmark(group, fd, filler.MASK)
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            return exc
        raise
    finally:
        os.close(fd)
        probe.unlink()
    return None


def lazy_base(choice: str, objects: ObjectStore, snapshot: Digest | None, trust_owners: bool,
              sdir: Path) -> Path | None:
    """For ``lazy`` on a snapshot whose base is not cached: build its skeleton, start its
    filler, and return it; None when the base is cached, the disk is new, or this machine
    cannot fill lazily (then a one-line notice says why).

    ``auto`` does not choose it: its benchmark (bench/lazy.py, docs/benchmarks.md) has a job
    reading every file slower than an eager cold mount, and one reading 10% of the bytes not
    3x faster, so it stays opt-in.
    """
    if choice != "lazy" or snapshot is None:
        return None
    if basecache.base_path(snapshot, trust_owners).is_dir():
        return None
    try:
        group = fanotify.init()
    except OSError as exc:
        _notice(f"fanotify pre-content groups: {exc.strerror}")
        return None
    root = basecache.bases_root() / f".lazy-{snapshot.hex}-{uuid.uuid4().hex}"
    kept: dict[str, int] = {}
    try:
        root.mkdir(parents=True)
        refused = _probe(group, root)
        if refused:
            _notice(f"pre-content marks on {root.parent}: {refused.strerror}")
            remove_tree(root)
            return None
        m = load_manifest(objects, snapshot)
        kept = skeleton(m, str(root), group, trust_owners)
        root = root.resolve()
        sdir.mkdir(parents=True, exist_ok=True)
        (sdir / LAZY_FILE).write_text(json.dumps({"root": str(root)}))

        def publish() -> None:
            # Filled: an ordinary base from now on, for the next mount of this snapshot.
            try:
                basecache.publish(root, snapshot, m.size, trust_owners)
            except OSError as exc:  # an unmount moved it away first
                log.info("the lazy base %s is not kept: %s", root, exc.strerror)

        filler.start(group, root, m, objects.backend.url, sdir, publish, kept)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            (sdir / LAZY_FILE).unlink()
        remove_tree(root)
        raise
    finally:
        for fd in kept.values():
            os.close(fd)
        os.close(group)
    return root


def skeleton(m: Manifest, root: str, group: int, trust_owners: bool) -> dict[str, int]:
    """Write the tree ``m`` describes into the new, empty ``root`` with the restore's rules
    (``materialize``), every file a sparse placeholder of its size marked for ``group``;
    return the placeholders' fds by path, opened before their mark (so writes through them
    raise no event), as many as this process may keep open (the caller closes them)."""
    kept: dict[str, int] = {}
    room = _fd_room(len(m.entries))

    def placeholder(e: Entry, fd: int) -> None:
        os.ftruncate(fd, e.size)
        if e.size:
            fanotify.mark(group, fd, filler.MASK)
            if len(kept) < room:
                kept[e.path] = os.dup(fd)  # the restore closes its own

    try:
        materialize(m, root, placeholder, trust_owners=trust_owners, parallel=False)
    except BaseException:
        for fd in kept.values():
            os.close(fd)
        raise
    return kept


def _fd_room(files: int) -> int:
    """How many placeholder fds the skeleton may keep for the filler (at most one per file,
    ``filler.MAX_KEPT`` in all), raising this process's fd limit (the daemon inherits it) as
    far as allowed; the files beyond are filled through fds the filler opens itself."""
    spare = 1024  # for everything else the mount and the filler open
    want = min(files, filler.MAX_KEPT) + spare
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if want > soft:
        try:
            # Above the hard limit only with CAP_SYS_RESOURCE (root, as a lazy mount is).
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
        except (ValueError, OSError):
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max(0, min(files, filler.MAX_KEPT, soft - spare))


def discard(sdir: Path) -> None:
    """Stop the filler of a mount and remove its base unless it was published complete.

    The base is moved away first: once the filler stops, nothing guards its placeholders.
    """
    try:
        root = Path(json.loads((sdir / LAZY_FILE).read_text())["root"])
    except (OSError, ValueError, KeyError, TypeError):
        root = None
    doomed = None
    bases = basecache.bases_root().resolve()
    if root and root.parent == bases and root.name.startswith(".lazy-"):
        doomed = bases / f".gone-{uuid.uuid4().hex}"
        try:
            os.rename(root, doomed)
        except FileNotFoundError:
            doomed = None  # published, or already gone
    filler.stop(sdir)
    if doomed:
        remove_tree(doomed)
