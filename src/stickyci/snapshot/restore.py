"""Restoring a snapshot into an empty directory: bytes, modes, times, links and ownership."""

from __future__ import annotations

import os
from collections.abc import Callable

from ..digest import Digest
from ..errors import UsageError
from ..forked import PARALLEL_MIN_BYTES, WORKERS, aborted, forked_map
from ..store import ObjectStore
from .model import DIR, FILE, SYMLINK, Entry, Manifest, validate

_ROOT = os.geteuid() == 0


WriteContent = Callable[[Entry, int], None]


def restore(store: ObjectStore, m: Manifest, root: str) -> None:
    """Write the tree ``m`` describes into ``root`` (existing, empty), content from the store."""

    def write(e: Entry, fd: int) -> None:
        for hexd, _ in e.chunks:
            data = memoryview(store.get(Digest(bytes.fromhex(hexd)), whole_pack=True))
            while data:
                data = data[os.write(fd, data):]

    def where(e: Entry) -> tuple[str, int]:
        loc = store.locate(Digest(bytes.fromhex(e.chunks[0][0]))) if e.chunks else None
        return (loc.pack, loc.offset) if loc else ("", 0)

    # In pack order, each pack is read once, front to back, however the tree was walked.
    materialize(m, root, write, order=where)


def materialize(m: Manifest, root: str, write_content: WriteContent,
                order: Callable[[Entry], tuple[str, int]] | None = None) -> None:
    """Write the tree ``m`` describes into ``root``, which must exist and be empty.

    ``write_content`` fills each regular file (once per hardlink group) through an open fd;
    ``order`` may sort the files for the content source's sake.

    The manifest is validated first, so an unsafe entry is refused before anything is written.
    Directories get their final modes and times last, since writing into them changes both.
    """
    validate(m)
    if os.listdir(root):
        raise UsageError(f"{root} is not empty; restore needs an empty directory")
    entries = m.sorted_entries()
    dirs = [e for e in entries if e.kind == DIR]
    for e in dirs:
        os.mkdir(os.path.join(root, e.path), 0o700)

    leaders: dict[int, str] = {}
    files: list[Entry] = []
    links: list[Entry] = []
    for e in entries:
        if e.kind != FILE:
            continue
        if e.link and e.link in leaders:
            links.append(e)
            continue
        if e.link:
            leaders[e.link] = e.path
        files.append(e)

    if order:
        files.sort(key=order)
    if sum(e.size for e in files) < PARALLEL_MIN_BYTES:
        for e in files:
            _write_file(root, e, write_content)
    else:
        # Contiguous runs of files, so each worker reads its packs front to back.
        step = max(1, len(files) // (WORKERS * 8))
        runs = [files[i:i + step] for i in range(0, len(files), step)]

        def work(i: int) -> None:
            for e in runs[i]:
                if aborted():
                    return
                _write_file(root, e, write_content)

        for _ in forked_map(work, range(len(runs))):
            pass
    for e in links:
        os.link(os.path.join(root, leaders[e.link]), os.path.join(root, e.path))
    for e in entries:
        if e.kind == SYMLINK:
            path = os.path.join(root, e.path)
            os.symlink(e.target, path)
            _finish(path, e, follow=False)
    for e in reversed(dirs):
        _finish(os.path.join(root, e.path), e, follow=True)


def _write_file(root: str, e: Entry, write_content: WriteContent) -> None:
    path = os.path.join(root, e.path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        write_content(e, fd)
        if _ROOT:
            os.fchown(fd, e.uid, e.gid)
        os.fchmod(fd, e.mode)
        os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
    finally:
        os.close(fd)


def _finish(path: str, e: Entry, *, follow: bool) -> None:
    if _ROOT:
        os.chown(path, e.uid, e.gid, follow_symlinks=follow)
    if follow:
        os.chmod(path, e.mode)
    os.utime(path, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=follow)
