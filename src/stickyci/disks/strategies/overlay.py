"""The overlay strategy: overlayfs over the base; a commit reads only the upper dir."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

from ...errors import UsageError
from ...fsutil import Found, Tree
from ...snapshot import (
    DIR,
    FILE,
    Entry,
    Manifest,
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
        upper, work = sdir / "upper", sdir / "work"
        upper.mkdir(parents=True)
        work.mkdir()
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

    def changes(self, path: Path, sdir: Path, base: Manifest,
                trust_owners: bool) -> tuple[Scan, Tree]:
        """The new tree: the base with the upper dir's whiteouts, opaque dirs and files applied."""
        upper = Tree.at(sdir / "upper")
        up: dict[str, Entry] = {}
        gone: set[str] = set()
        opaque: set[str] = set()
        scan = Scan()
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
                keep_base_meta(e, base.entries.get(rel))
            # A non-dir in the upper layer hides everything under its path in the lower one
            # (a directory replaced by a file leaves no whiteouts for its children).
            if e.kind != DIR or _is_opaque(found):
                opaque.add(rel)
            if e.kind == FILE:
                if st.st_nlink > 1:
                    e.link = groups.setdefault(st.st_ino, -(len(groups) + 1))
                scan.todo.append(e)
            up[rel] = e
        merged = dict(base.entries)
        hidden = [p for p in merged if _hidden(p, gone, opaque)] if gone or opaque else []
        for p in hidden:
            del merged[p]
        merged.update(up)
        scan.manifest = Manifest(merged)
        scan.touched = {*up, *hidden}
        return scan, upper


def _is_opaque(found: Found) -> bool:
    try:
        return found.getxattr(_OPAQUE) == b"y"
    except OSError:
        return False


def _hidden(path: str, gone: set[str], opaque: set[str]) -> bool:
    """True if a lower path is deleted by a whiteout on it or an ancestor, or is under an
    opaque directory or an upper non-directory."""
    if path in gone:
        return True
    parent = path
    while "/" in parent:
        parent = parent.rpartition("/")[0]
        if parent in gone or parent in opaque:
            return True
    return False
