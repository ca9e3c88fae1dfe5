"""Walking a tree: every path with its ``lstat``, and turning a stat into a manifest entry."""

from __future__ import annotations

import logging
import os
import stat as st_
from collections.abc import Iterator
from typing import NamedTuple

from .model import DIR, FILE, SYMLINK, Entry

log = logging.getLogger("stickyci")
_ROOT = os.geteuid() == 0


class StatKey(NamedTuple):
    """What says a file is unchanged since it was written: same inode, size, mtime, ctime."""

    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> StatKey:
        """The key of a stat result."""
        return cls(st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def walk(root: str) -> Iterator[tuple[str, os.stat_result]]:
    """Yield ``(relative path, lstat)`` for everything under ``root``; symlinks are not followed."""
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(root, rel) if rel else root) as it:
            for de in it:
                path = f"{rel}/{de.name}" if rel else de.name
                st = de.stat(follow_symlinks=False)
                yield path, st
                if st_.S_ISDIR(st.st_mode):
                    stack.append(path)


def is_special(st: os.stat_result) -> bool:
    """Sockets, fifos and devices: not stored."""
    return not (st_.S_ISDIR(st.st_mode) or st_.S_ISREG(st.st_mode) or st_.S_ISLNK(st.st_mode))


def skip_special(path: str, st: os.stat_result) -> None:
    """Warn that a special file is left out of the snapshot."""
    log.warning("skipping %s: sockets, fifos and devices are not stored in snapshots", path)


def to_entry(root: str, path: str, st: os.stat_result) -> Entry:
    """A manifest entry for a dir, file or symlink (file chunks are filled in later)."""
    mode = st_.S_IMODE(st.st_mode)
    uid, gid = (st.st_uid, st.st_gid) if _ROOT else (0, 0)
    if st_.S_ISDIR(st.st_mode):
        return Entry(path, DIR, mode, st.st_mtime_ns, uid, gid)
    if st_.S_ISLNK(st.st_mode):
        target = os.readlink(os.path.join(root, path))
        return Entry(path, SYMLINK, mode, st.st_mtime_ns, uid, gid, target=target)
    return Entry(path, FILE, mode, st.st_mtime_ns, uid, gid, size=st.st_size)
