"""The reflink and copy strategies: a private clone of the base; commit rescans by stat.

Right after cloning, every file's (inode, size, mtime, ctime) is recorded; at commit a file
whose stat still matches keeps the base's chunk list unread. ctime cannot be set from user
space, so a tool that restores an old mtime after writing is still caught. The clone's root
inode is recorded too: a commit reads the directory that was mounted, not whatever a racing
process has since renamed into its place.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat as st_
from collections.abc import Callable
from pathlib import Path

from ...errors import UsageError
from ...fsutil import Opener, Tree, empty_dir
from ...snapshot import ContentFill, Entry, Manifest, Scan, StatKey, materialize, restore, scan_tree
from ...store import ObjectStore

FICLONE = 0x40049409


def _record(path: Path, sdir: Path) -> None:
    """Record the clone's root and the stat of each of its files, for ``changes``."""
    tree = Tree.at(path)
    stats = {f.path: list(StatKey.of(f.stat)) for f in tree.walk()
             if st_.S_ISREG(f.stat.st_mode)}
    (sdir / "stat.json").write_text(json.dumps({"root": [tree.dev, tree.ino], "files": stats}))


def _reflink(src: int, dst: int) -> None:
    fcntl.ioctl(dst, FICLONE, src)


def _copy(src: int, dst: int) -> None:
    size = os.fstat(src).st_size
    done = 0
    while done < size:
        n = os.copy_file_range(src, dst, size - done)
        if n == 0:
            break
        done += n


class Clone:
    """A full clone of the base at the mount path, file data by reflink or by copy."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._clone = _reflink if name == "reflink" else _copy
        self.unsupported = frozenset(
            {errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.ENOSYS}
            if name == "reflink" else set())

    def mount(self, base: Path, path: Path, sdir: Path, manifest: Callable[[], Manifest],
              trust_owners: bool) -> None:
        """Clone the base tree into ``path`` and record the stat of every file."""
        sdir.mkdir(parents=True, exist_ok=True)
        if self.name == "reflink":
            self._probe(base, path)

        # The base is read like any tree: never through a symlink, in case it does not match
        # its manifest. Forked workers inherit the opener; each then has its own copy.
        with Opener(Tree.at(base)) as source:

            def write(e: Entry, fd: int) -> None:
                src = source.open(e.path, os.O_RDONLY)
                try:
                    self._clone(src, fd)
                finally:
                    os.close(src)

            try:
                materialize(manifest(), str(path), write, trust_owners=trust_owners)
            except OSError:
                empty_dir(path)
                raise
        _record(path, sdir)

    def restore(self, objects: ObjectStore, m: Manifest, path: Path, sdir: Path,
                trust_owners: bool) -> None:
        """Restore ``m`` from the store straight into ``path`` (no base in between) and
        record the stat of every file, as :meth:`mount` does after cloning a base."""
        sdir.mkdir(parents=True, exist_ok=True)
        restore(objects, m, str(path), trust_owners=trust_owners)  # a failed mount empties path
        _record(path, sdir)

    def _probe(self, base: Path, path: Path) -> None:
        # One clone up front, so an unsupported filesystem falls through before any work.
        src_path, dst_path = base.parent / f".probe-{os.getpid()}", path / ".stickyci-probe"
        src_path.write_bytes(b"x")
        try:
            # Only a new file: a symlink planted at the probe's name must not be written through.
            dst = os.open(dst_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                          | os.O_CLOEXEC, 0o600)
            try:
                with open(src_path, "rb") as s:
                    _reflink(s.fileno(), dst)
            finally:
                os.close(dst)
                dst_path.unlink(missing_ok=True)
        finally:
            src_path.unlink()

    def is_mounted(self, path: Path) -> bool:
        """A clone is a plain directory; the mount record alone says it is one."""
        return path.is_dir()

    def unmount(self, path: Path, sdir: Path) -> None:
        """Discard the clone, leaving ``path`` empty."""
        if path.is_dir():
            empty_dir(path)

    def changes(self, path: Path, sdir: Path, base: Manifest, trust_owners: bool,
                fill: ContentFill | None = None) -> tuple[Scan, Tree]:
        """Rescan the clone; files whose stat is unchanged since the clone keep their entry."""
        try:
            recorded = json.loads((sdir / "stat.json").read_text())
            dev, ino = recorded["root"]
            tree = Tree(str(path), int(dev), int(ino))
            stats = {p: StatKey(*v) for p, v in recorded["files"].items()}
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise UsageError(f"the mount record of {path} is damaged ({exc}); unmount it") from exc

        entries = base.entries  # a rescan reads them all

        def reuse(e: Entry, st: os.stat_result) -> Entry | None:
            if stats.get(e.path) == StatKey.of(st):
                return entries.get(e.path)
            return None

        return scan_tree(tree, reuse, None if trust_owners else base, fill), tree
