"""Filesystem helpers shared by the layers: trees read and written only through directory
fds (so a racing process cannot redirect a commit or a restore outside them), and removing
trees that may hold read-only dirs."""

from __future__ import annotations

import contextlib
import errno
import mmap
import operator
import os
import shutil
import stat
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

from .errors import BusyError

# Every component below a tree's root is opened relative to its parent without following a
# symlink: a directory swapped for a symlink, however timed, fails to open instead of leading
# the walk outside the tree.
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# What opening a component that was just moved, removed or replaced by a symlink fails with.
_SWAPPED = frozenset({errno.ELOOP, errno.ENOTDIR, errno.ENOENT, errno.EEXIST})


_EMPTY_TRIES = 100


def changed_error(root: str, rel: str = "") -> BusyError:
    """The error for a tree changed under a commit or restore in a way that could lead outside
    it: a path component moved, removed or replaced by a symlink."""
    where = os.path.join(root, rel) if rel else root
    return BusyError(f"{where} changed while stickyci was reading or writing it (moved, removed "
                     "or replaced by a symlink); stop the processes writing there and retry")


class Found(NamedTuple):
    """An entry met by ``Tree.walk``: its path below the root, name, ``lstat``, an fd of its
    parent directory (valid until the walk moves on) and the root's path, for messages."""

    path: str
    name: str
    stat: os.stat_result
    parent: int
    root: str

    def readlink(self) -> str:
        """The target of this symlink, read through its parent's fd."""
        try:
            return os.readlink(self.name, dir_fd=self.parent)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOENT):  # no longer a symlink
                raise changed_error(self.root, self.path) from exc
            raise

    def getxattr(self, attribute: str) -> bytes:
        """An extended attribute of this entry (not of a symlink's target)."""
        # The magic link pins the parent fd's directory; only the last name is looked up.
        return os.getxattr(f"/proc/self/fd/{self.parent}/{self.name}", attribute,
                           follow_symlinks=False)


@dataclass(frozen=True, slots=True)
class Tree:
    """A directory, known by its inode, read and written only through file descriptors.

    Reopening the root checks that it is still the same directory, and each path below it is
    resolved one component at a time from its parent's fd, never following a symlink: no
    rename or symlink swap, however timed, makes an operation on the tree reach outside it.
    """

    path: str
    dev: int
    ino: int

    @classmethod
    def at(cls, path: str | Path) -> Tree:
        """The directory now at ``path`` (its last component must not be a symlink)."""
        fd = _open_dir(str(path))
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        return cls(str(path), st.st_dev, st.st_ino)

    def open_root(self) -> int:
        """A new fd of the root; ``BusyError`` if another directory has taken its path."""
        fd = _open_dir(self.path)
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (self.dev, self.ino):
            os.close(fd)
            raise changed_error(self.path)
        return fd

    def walk(self) -> Iterator[Found]:
        """Every entry below the root with its ``lstat``, each directory before its entries,
        a directory's entries by name (the order of ``scandir`` is the filesystem's: ext4
        hashes names with a seed of its own, so the same tree on two machines would be read,
        and its small files bundled, in two orders).

        A directory is entered through its parent's fd and must be the inode its ``lstat``
        described; only the directories on the current path are open at any time.
        """
        frames: list[tuple[int, str, list[tuple[str, os.stat_result]]]] = []
        try:
            fd, rel = self.open_root(), ""
            while True:
                subdirs: list[tuple[str, os.stat_result]] = []
                frames.append((fd, rel, subdirs))
                with os.scandir(fd) as it:
                    listed = sorted(it, key=operator.attrgetter("name"))
                for de in listed:
                    st = de.stat(follow_symlinks=False)
                    yield Found(f"{rel}/{de.name}" if rel else de.name, de.name, st, fd,
                                self.path)
                    if stat.S_ISDIR(st.st_mode):
                        subdirs.append((de.name, st))
                subdirs.reverse()
                while frames and not frames[-1][2]:
                    os.close(frames.pop()[0])
                if not frames:
                    return
                parent, prel, todo = frames[-1]
                name, st = todo.pop()
                rel = f"{prel}/{name}" if prel else name
                fd = self._enter(parent, name, rel)
                entered = os.fstat(fd)
                if (entered.st_dev, entered.st_ino) != (st.st_dev, st.st_ino):
                    os.close(fd)
                    raise changed_error(self.path, rel)
        finally:
            for fd, _, _ in frames:
                os.close(fd)

    def _enter(self, parent: int, name: str, rel: str) -> int:
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            if exc.errno in _SWAPPED:
                raise changed_error(self.path, rel) from exc
            raise


def _open_dir(path: str) -> int:
    try:
        return os.open(path, _DIR_FLAGS)
    except OSError as exc:
        if exc.errno in _SWAPPED:
            raise changed_error(path) from exc
        raise


class Opener:
    """Opens paths below a tree's root one component at a time, without following symlinks.

    The directories of the last path opened stay open, so the files of one directory cost one
    ``open`` each, as a plain path would. Use it as a context manager, one per process.
    """

    def __init__(self, tree: Tree) -> None:
        self.tree = tree
        self.root = tree.open_root()
        self._chain: list[tuple[str, int]] = []  # (name, fd) of each directory on the path

    def __enter__(self) -> Opener:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close every fd this opener holds."""
        while self._chain:
            os.close(self._chain.pop()[1])
        os.close(self.root)

    def dir(self, rel: str) -> int:
        """An fd of the directory ``rel`` ("" for the root), owned by the opener and valid
        until its next call."""
        parts = rel.split("/") if rel else []
        chain = self._chain
        keep = 0
        while keep < len(chain) and keep < len(parts) and chain[keep][0] == parts[keep]:
            keep += 1
        while len(chain) > keep:
            os.close(chain.pop()[1])
        fd = chain[-1][1] if chain else self.root
        for i in range(keep, len(parts)):
            try:
                fd = os.open(parts[i], _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in _SWAPPED:
                    raise changed_error(self.tree.path, "/".join(parts[:i + 1])) from exc
                raise
            chain.append((parts[i], fd))
        return fd

    def parent(self, rel: str) -> tuple[int, str]:
        """An fd of the directory holding ``rel`` (as ``dir``) and ``rel``'s last name."""
        head, _, name = rel.rpartition("/")
        return self.dir(head), name

    def open(self, rel: str, flags: int, mode: int = 0o777) -> int:
        """``os.open`` of ``rel`` (never through or onto a symlink); the caller closes it."""
        parent, name = self.parent(rel)
        try:
            return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=parent)
        except OSError as exc:
            if exc.errno in _SWAPPED:
                raise changed_error(self.tree.path, rel) from exc
            raise

    def link(self, existing: str, rel: str) -> None:
        """Hard-link ``rel`` to the file ``existing`` (neither followed if a symlink)."""
        # The existing file's directory fd is the opener's until its next call: keep a copy.
        src_dir, src_name = self.parent(existing)
        src_dir = os.dup(src_dir)
        try:
            dst_dir, dst_name = self.parent(rel)
            os.link(src_name, dst_name, src_dir_fd=src_dir, dst_dir_fd=dst_dir,
                    follow_symlinks=False)
        finally:
            os.close(src_dir)


def _open_up(path: str) -> None:
    # Snapshots may contain read-only directories; their entries cannot be unlinked as non-root.
    for root, dirs, _ in os.walk(path):
        for d in dirs:
            p = os.path.join(root, d)
            with contextlib.suppress(OSError):
                if not os.path.islink(p):
                    os.chmod(p, stat.S_IRWXU)


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` durable (after a rename into it, say)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_tree(path: Path | str) -> None:
    """Remove ``path`` and everything under it, if it exists."""
    if not os.path.lexists(path):
        return
    if os.geteuid() != 0:
        _open_up(str(path))
    shutil.rmtree(path, ignore_errors=True)


def empty_dir(path: Path | str) -> None:
    """Remove everything inside ``path``, keeping the directory itself."""
    if os.geteuid() != 0:
        _open_up(str(path))
    fd = _open_dir(str(path))
    try:
        # A process may still be renaming things in there: an entry can change type between
        # the two attempts, so go round again until the directory is empty. rmtree through a
        # dir fd never follows a symlink out of the tree.
        for _ in range(_EMPTY_TRIES):
            names = os.listdir(fd)
            if not names:
                return
            for name in names:
                try:
                    os.unlink(name, dir_fd=fd)
                except IsADirectoryError:
                    shutil.rmtree(name, ignore_errors=True, dir_fd=fd)
                except FileNotFoundError:
                    continue
        raise changed_error(str(path))
    finally:
        os.close(fd)


def remove_later(path: Path, trash: Path) -> None:
    """Move ``path`` into ``trash`` (same filesystem) now, and delete it in the background.

    Deleting an overlay upper dir full of copied-up files takes longer than the rest of a small
    commit; nobody waits for it, so a detached ``rm`` does it.
    """
    trash.mkdir(parents=True, exist_ok=True)
    doomed = trash / uuid.uuid4().hex
    try:
        os.rename(path, doomed)
    except FileNotFoundError:
        return
    except OSError:
        remove_tree(path)
        return
    delete_in_background(doomed)


def delete_in_background(path: Path) -> None:
    """Delete ``path`` in a detached ``rm``, which nobody waits for."""
    subprocess.Popen(["rm", "-rf", "--", str(path)], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)


@contextlib.contextmanager
def discarding(tree: Path) -> Iterator[Callable[[int, str], None]]:
    """``discard(dir_fd, name)`` for the block: it moves an entry of ``tree`` into a directory
    beside it (``.gone-…``), which is deleted in the background once the block is over."""
    doomed = tree.parent / f".gone-{uuid.uuid4().hex}"
    doomed.mkdir()
    gone = os.open(doomed, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    names: list[str] = []

    def discard(parent: int, name: str) -> None:
        names.append(str(len(names)))
        os.rename(name, names[-1], src_dir_fd=parent, dst_dir_fd=gone)

    try:
        yield discard
    finally:
        os.close(gone)
        if names:
            delete_in_background(doomed)
        else:
            doomed.rmdir()


MADV_POPULATE_READ = 22
"""Linux 5.14's madvise that reads a mapping's pages in and waits (Python 3.11 has no name
for it)."""


def page_in(mapped: mmap.mmap, start: int, end: int) -> None:
    """Read the pages of ``mapped[start:end]`` in now, so that touching them later (in a
    ``send`` on an event loop) does not wait for the disk. Older kernels get a read-ahead
    hint instead."""
    start -= start % mmap.PAGESIZE
    end = min(end, len(mapped))
    if end <= start:
        return
    try:
        mapped.madvise(MADV_POPULATE_READ, start, end - start)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        mapped.madvise(mmap.MADV_WILLNEED, start, end - start)
