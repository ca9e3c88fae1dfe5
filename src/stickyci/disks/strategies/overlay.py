"""The overlay strategy: overlayfs over the base; a commit reads only the upper dir.

After a commit the old base patched with the upper dir's changes is the new snapshot's tree:
:func:`apply_upper` writes them into a private copy of the base, the content of every changed
file read from the upper dir and checked against the new manifest's chunk digests as it is
written, and the metadata set from the manifest as a restore sets it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

from ...errors import IntegrityError, UsageError
from ...forked import PARALLEL_MIN_BYTES, forked_runs
from ...fsutil import Found, Opener, Tree, discarding, remove_tree
from ...snapshot import (
    DIR,
    FILE,
    SYMLINK,
    Content,
    ContentFill,
    Entry,
    Manifest,
    Metadata,
    Scan,
    is_special,
    keep_base_meta,
    skip_special,
    to_entry,
)

_libc = ctypes.CDLL(None, use_errno=True)
# Fixed features, so the upper dir always has the layout this module reads: no redirects or
# metadata-only copy-ups, which would need the lower layer to interpret.
_OPTIONS = "redirect_dir=off,metacopy=off,index=off"
# The upper dir is scratch: a commit reads it and writes the store durably itself. Without
# "volatile", unmounting syncs every copied-up byte to disk first (about 1 s for a 1% change
# of a 1.2 GB tree here) only for the upper dir to be deleted.
_VOLATILE = ",volatile"
_OPAQUE = "trusted.overlay.opaque"


_libc.syscall.restype = ctypes.c_long
# open_tree(2) (Linux 5.2; its number is the same on every architecture since 5.x's unified
# table): a detached clone of a mount, held by an fd.
_OPEN_TREE, _AT_FDCWD, _OPEN_TREE_CLONE = 428, -100, 1


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), what)


class Overlay:
    """overlayfs: an O(1) mount; commit walks the upper dir (whiteouts and opaque dirs too)."""

    name = "overlay"
    unsupported = frozenset({errno.EPERM, errno.ENODEV, errno.EINVAL, errno.EOPNOTSUPP,
                             errno.ENOSYS})

    def mount(self, base: Path, path: Path, sdir: Path, manifest: Callable[[], Manifest],
              trust_owners: bool) -> None:
        """Mount ``base`` (read-only lower) with a fresh upper under ``sdir`` at ``path``."""
        (sdir / "upper").mkdir(parents=True)
        (sdir / "work").mkdir()
        self._mount(base, path, sdir)

    def remount(self, base: Path, path: Path, sdir: Path) -> None:
        """Mount ``base`` at ``path`` again over the upper dir an earlier mount left there
        (a commit unmounted it to read it, then failed or was killed), with a fresh work dir:
        a volatile overlay's work dir refuses a second mount."""
        remove_tree(sdir / "work")
        (sdir / "work").mkdir()
        self._mount(base, path, sdir)

    def _mount(self, base: Path, path: Path, sdir: Path) -> None:
        upper, work = sdir / "upper", sdir / "work"
        for p in (base, upper, work):
            if any(c in str(p) for c in ",:\\"):
                raise UsageError(f"overlay cannot use {p}: its path has ',', ':' or '\\'; "
                                 "set STICKYCI_CACHE_DIR to a plainer path")
        opts = f"lowerdir={base},upperdir={upper},workdir={work},{_OPTIONS}"
        target = str(path).encode()
        if _libc.mount(b"overlay", target, b"overlay", 0, (opts + _VOLATILE).encode()) != 0:
            # Kernels before 5.10 lack "volatile"; the mount works without it, only slower.
            _check(_libc.mount(b"overlay", target, b"overlay", 0, opts.encode()), str(path))

    def is_mounted(self, path: Path) -> bool:
        """True if an overlay is mounted at ``path``."""
        return os.path.ismount(path)

    def unmount(self, path: Path, sdir: Path) -> None:
        """Unmount; the upper dir goes with the mount record."""
        if os.path.ismount(path):
            _check(_libc.umount2(str(path).encode(), 0), str(path))

    def changes(self, path: Path, sdir: Path, base: Manifest, trust_owners: bool,
                fill: ContentFill | None = None) -> tuple[Scan, Tree]:
        """The new tree: the base with the upper dir's whiteouts, opaque dirs and files applied."""
        upper = Tree.at(sdir / "upper")
        up: dict[str, Entry] = {}
        gone: set[str] = set()
        opaque: set[str] = set()
        scan = Scan(fill=fill)
        if fill is not None:
            fill.read_from(upper)
        groups: dict[int, int] = {}
        for found in upper.walk():
            rel, st = found.path, found.stat
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                gone.add(rel)
                continue
            if is_special(st):
                skip_special(rel, st)
                scan.skipped += 1
                continue
            e = to_entry(found)
            if not trust_owners:
                keep_base_meta(e, base.get(rel))
            # A non-dir in the upper layer hides everything under its path in the lower one
            # (a directory replaced by a file leaves no whiteouts for its children).
            if e.kind != DIR or _is_opaque(found):
                opaque.add(rel)
            if e.kind == FILE:
                if st.st_nlink > 1:
                    e.link = groups.setdefault(st.st_ino, -(len(groups) + 1))
                scan.read_later(e)
            up[rel] = e
        hidden = _hidden(base, gone, opaque)
        changes: dict[str, Entry | None] = dict.fromkeys(hidden)
        changes.update(up)
        scan.manifest = Manifest.patched(base, changes)
        scan.touched = set(changes)
        return scan, upper


class Teardown:
    """An overlay unmounted from its path and kept alive by a detached clone of its mount, so
    that freeing what it cached (a dentry and an inode per path a job looked at: 80 ms for the
    38k paths of the 1 GB benchmark tree, in ``umount`` itself) can run beside the commit:
    :meth:`start` hands the last reference to a child process, whose exit frees it all."""

    def __init__(self, clone: int | None) -> None:
        self._clone = clone  # None: the kernel has no open_tree, the umount freed it all
        self._child: int | None = None

    def start(self) -> None:
        """Let a child process free the overlay; return at once."""
        clone, self._clone = self._clone, None
        if clone is None:
            return
        pipe: tuple[int, int] | tuple[()] = ()
        try:
            pipe = os.pipe()
            # Spawned (vfork and exec), not forked: a fork copies this process's page
            # tables, 25-35 ms for a process of 900 MB. ``cat`` holds the clone as fd 3 until
            # its stdin ends, which is once the copy here is closed: its exit frees it.
            self._child = os.posix_spawnp("cat", ["cat"], os.environ, file_actions=[
                (os.POSIX_SPAWN_DUP2, pipe[0], 0), (os.POSIX_SPAWN_DUP2, clone, 3),
                (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)])
        except OSError:
            self._child = None  # freed here then, as an umount would
        finally:
            os.close(clone)  # before the pipe: the child's copy must be the last one
            for fd in pipe:
                os.close(fd)

    def wait(self) -> None:
        """Wait until the overlay is freed (its upper dir is then in no mount's use)."""
        if self._clone is not None:
            os.close(self._clone)
            self._clone = None
        child, self._child = self._child, None
        if child is not None:
            os.waitpid(child, 0)


def detach(path: Path) -> Teardown:
    """Unmount the overlay at ``path`` (``OSError`` EBUSY if a process holds it) and return
    its :class:`Teardown`, not yet started."""
    target = str(path).encode()
    clone = _libc.syscall(_OPEN_TREE, _AT_FDCWD, target, _OPEN_TREE_CLONE | os.O_CLOEXEC)
    held = Teardown(int(clone) if clone >= 0 else None)
    try:
        _check(_libc.umount2(target, 0), str(path))
    except BaseException:
        held.wait()  # the mount is still there: dropping the clone frees nothing
        raise
    return held


def _is_opaque(found: Found) -> bool:
    try:
        return found.getxattr(_OPAQUE) == b"y"
    except OSError:
        return False


def _hidden(base: Manifest, gone: set[str], opaque: set[str]) -> list[str]:
    """The lower paths deleted by a whiteout on them or an ancestor, or under an opaque
    directory or an upper non-directory."""
    return sorted({p for p in gone if base.get(p) is not None} | base.under(gone | opaque))


def apply_upper(tree: Path, upper: Path, base: Manifest, new: Manifest, touched: set[str],
                trust_owners: bool, content: Content, *, sealed: bool = False) -> None:
    """Turn ``tree``, a private copy of the base that ``base`` describes, into the tree ``new``
    describes, taking new content from the overlay's ``upper`` dir.

    Only ``touched`` paths (the commit's scan of the upper dir) can differ. Every file among
    them is written afresh, its bytes checked against its chunks as they are copied (a small
    file's against its slice of a bundle, which ``content`` reads from the store): a process
    still writing to the upper dir (through a descriptor opened before the commit, or a copy
    of the mount in another namespace) makes this fail with ``IntegrityError``, never puts
    its bytes in the tree. Owners and modes are set as a restore with or without
    ``trust_owners`` sets them.

    A ``sealed`` upper dir is one nothing can write to any more (the commit read it after
    the overlay was unmounted and let go of): its files are moved into the tree as they are.
    """
    # Overlay keeps no hardlink between layers: a touched path never shares a group with one
    # left as it was, so its groups are its own.
    for p in touched:
        e = new.get(p)
        if e is not None and e.link > 0:
            raise IntegrityError(f"{p} is linked to a path the commit did not touch")
    # What the patch removes (a rebuilt binary's old copy: 65 ms of a 0.57 s commit to
    # unlink) is moved aside and deleted in the background.
    with Opener(Tree.at(tree)) as out, Opener(Tree.at(upper)) as src, \
            discarding(tree) as discard:
        kept: set[str] = set()
        removed: set[str] = set()
        for p in sorted(touched):  # a directory sorts before what it holds
            old, e = base.get(p), new.get(p)
            if old is None or any(a in removed for a in _ancestors(p)):
                continue
            if old.kind == DIR and e is not None and e.kind == DIR:
                kept.add(p)
                continue
            discard(*out.parent(p))
            removed.add(p)
        leaders: dict[int, str] = {}
        files: list[Entry] = []
        links: list[Entry] = []
        for p in sorted(touched):
            e = new.get(p)
            if e is None or p in kept:
                continue
            if e.kind == DIR:
                parent, name = out.parent(p)
                os.mkdir(name, 0o700, dir_fd=parent)
            elif e.kind == SYMLINK:
                parent, name = out.parent(p)
                os.symlink(e.target, name, dir_fd=parent)
                Metadata(trust_owners).apply_to_symlink(parent, name, e)
            elif e.link and e.link in leaders:
                links.append(e)
            else:
                if e.link:
                    leaders[e.link] = p
                files.append(e)
        if sealed:
            for e in files:
                _move_file(src, out, e, trust_owners, content)
        elif sum(e.size for e in files) < PARALLEL_MIN_BYTES:
            for e in files:
                _copy_file(src, out, e, trust_owners, content)
        else:
            # A full commit copies the whole tree: on every core, as the restore writes it.
            def copy(run: Iterable[Entry]) -> None:
                with Opener(Tree.at(tree)) as mine, Opener(Tree.at(upper)) as theirs:
                    for e in run:
                        _copy_file(theirs, mine, e, trust_owners, content)

            forked_runs(files, copy)
        for e in links:
            out.link(leaders[e.link], e.path)
        dirs = {d: e for p in touched for d in (p, *_ancestors(p))
                if (e := new.get(d)) is not None and e.kind == DIR}
        for d in sorted(dirs, reverse=True):  # children first: writing in a dir moves its mtime
            fd = out.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                Metadata(trust_owners).apply(fd, dirs[d])
            finally:
                os.close(fd)


def _ancestors(p: str) -> list[str]:
    parts = p.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _move_file(src: Opener, out: Opener, e: Entry, trust_owners: bool,
               content: Content) -> None:
    """Move the file ``e`` from a sealed upper dir into the tree (copied, checked, where the
    two are on different filesystems)."""
    src_dir, src_name = src.parent(e.path)
    dst_dir, dst_name = out.parent(e.path)
    try:
        os.rename(src_name, dst_name, src_dir_fd=src_dir, dst_dir_fd=dst_dir)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _copy_file(src, out, e, trust_owners, content)
        return
    fd = out.open(e.path, os.O_RDONLY)
    try:
        if not trust_owners:
            # A restore without trusted owners writes its files as this user; the job may
            # have given this one to anybody.
            os.fchown(fd, os.geteuid(), os.getegid())
        Metadata(trust_owners).apply(fd, e)
    finally:
        os.close(fd)


def _copy_file(src: Opener, out: Opener, e: Entry, trust_owners: bool,
               content: Content) -> None:
    """Write the file ``e`` from the upper dir, checking each chunk as it is copied."""
    fd_in = src.open(e.path, os.O_RDONLY)
    try:
        fd_out = out.open(e.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            for ref in e.chunks:
                data = os.read(fd_in, ref[1])  # a short read cannot match either
                if not content.holds(ref, data, e.path):
                    raise IntegrityError(f"{e.path} changed after the commit read it")
                view = memoryview(data)
                while view:
                    view = view[os.write(fd_out, view):]
            if os.read(fd_in, 1):
                raise IntegrityError(f"{e.path} grew after the commit read it")
            Metadata(trust_owners).apply(fd_out, e)
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)
