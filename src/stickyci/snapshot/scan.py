"""Walking a tree: every path with its ``lstat``, and turning a stat into a manifest entry.

The walk goes through directory fds (``fsutil.Tree``), so a commit reads only what is inside
the tree, whatever a racing process renames or swaps for a symlink under it.
"""

from __future__ import annotations

import logging
import os
import stat as st_
from collections.abc import Iterator
from typing import NamedTuple

from ..fsutil import Found, Tree
from .model import DIR, FILE, SYMLINK, Entry

log = logging.getLogger("stickyci")
_ROOT = os.geteuid() == 0
_ME = (os.geteuid(), os.getegid())


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
    for found in Tree.at(root).walk():
        yield found.path, found.stat


def is_special(st: os.stat_result) -> bool:
    """Sockets, fifos and devices: not stored."""
    return not (st_.S_ISDIR(st.st_mode) or st_.S_ISREG(st.st_mode) or st_.S_ISLNK(st.st_mode))


def skip_special(path: str, st: os.stat_result) -> None:
    """Warn that a special file is left out of the snapshot."""
    log.warning("skipping %s: sockets, fifos and devices are not stored in snapshots", path)


def keep_base_meta(e: Entry, old: Entry | None) -> None:
    """Give the dir or symlink ``e`` the mode and owners of ``old``, its base entry, when the
    disk shows only what a restore without ``trust_owners`` made of them.

    Such a restore leaves setuid/setgid bits and owners off the disk; that is not a change the
    user made, and committing it would rewrite the snapshot's metadata on every commit. (Files
    are matched by their stat instead, since their content may have changed.)
    """
    if old is None or old.kind != e.kind or e.kind == FILE or old.target != e.target:
        return
    if e.mode == old.mode & 0o1777 and (not _ROOT or (e.uid, e.gid) == _ME):
        e.mode, e.uid, e.gid = old.mode, old.uid, old.gid


def to_entry(found: Found) -> Entry:
    """A manifest entry for a dir, file or symlink met by a walk (file chunks come later)."""
    path, st = found.path, found.stat
    mode = st_.S_IMODE(st.st_mode)
    uid, gid = (st.st_uid, st.st_gid) if _ROOT else (0, 0)
    if st_.S_ISDIR(st.st_mode):
        return Entry(path, DIR, mode, st.st_mtime_ns, uid, gid)
    if st_.S_ISLNK(st.st_mode):
        return Entry(path, SYMLINK, mode, st.st_mtime_ns, uid, gid, target=found.readlink())
    return Entry(path, FILE, mode, st.st_mtime_ns, uid, gid, size=st.st_size)
