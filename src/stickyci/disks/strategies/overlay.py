"""The overlay strategy: overlayfs over the base; a commit reads only the upper dir."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

from ...errors import UsageError
from ...snapshot import Entry, Manifest, Scan
from ...snapshot.model import DIR, FILE
from ...snapshot.scan import is_special, skip_special, to_entry, walk

_libc = ctypes.CDLL(None, use_errno=True)
# Fixed features, so the upper dir always has the layout this module reads: no redirects or
# metadata-only copy-ups, which would need the lower layer to interpret.
_OPTIONS = "redirect_dir=off,metacopy=off,index=off"
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

    def mount(self, base: Path, path: Path, sdir: Path, manifest: Callable[[], Manifest]) -> None:
        """Mount ``base`` (read-only lower) with a fresh upper under ``sdir`` at ``path``."""
        upper, work = sdir / "upper", sdir / "work"
        upper.mkdir(parents=True)
        work.mkdir()
        for p in (base, upper, work):
            if any(c in str(p) for c in ",:\\"):
                raise UsageError(f"overlay cannot use {p}: its path has ',', ':' or '\\'; "
                                 "set STICKYCI_CACHE_DIR to a plainer path")
        opts = f"lowerdir={base},upperdir={upper},workdir={work},{_OPTIONS}"
        _check(_libc.mount(b"overlay", str(path).encode(), b"overlay", 0, opts.encode()),
               str(path))

    def is_mounted(self, path: Path) -> bool:
        """True if an overlay is mounted at ``path``."""
        return os.path.ismount(path)

    def unmount(self, path: Path, sdir: Path) -> None:
        """Unmount; the upper dir goes with the mount record."""
        if os.path.ismount(path):
            _check(_libc.umount2(str(path).encode(), 0), str(path))

    def changes(self, path: Path, sdir: Path, base: Manifest) -> tuple[Scan, str]:
        """The new tree: the base with the upper dir's whiteouts, opaque dirs and files applied."""
        upper = str(sdir / "upper")
        up: dict[str, Entry] = {}
        gone: set[str] = set()
        opaque: set[str] = set()
        scan = Scan()
        groups: dict[int, int] = {}
        for rel, st in walk(upper):
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                gone.add(rel)
                continue
            if is_special(st):
                skip_special(rel, st)
                scan.skipped += 1
                continue
            e = to_entry(upper, rel, st)
            if e.kind == DIR and _is_opaque(os.path.join(upper, rel)):
                opaque.add(rel)
            if e.kind == FILE:
                if st.st_nlink > 1:
                    e.link = groups.setdefault(st.st_ino, -(len(groups) + 1))
                scan.todo.append(e)
            up[rel] = e
        entries = base.entries
        if gone or opaque:
            entries = {p: e for p, e in entries.items() if not _hidden(p, gone, opaque)}
        merged = dict(entries)
        merged.update(up)
        scan.manifest = Manifest(merged)
        return scan, upper


def _is_opaque(path: str) -> bool:
    try:
        return os.getxattr(path, _OPAQUE, follow_symlinks=False) == b"y"
    except OSError:
        return False


def _hidden(path: str, gone: set[str], opaque: set[str]) -> bool:
    """True if a lower path is deleted by a whiteout on it or an ancestor, or an opaque ancestor."""
    if path in gone:
        return True
    parent = path
    while "/" in parent:
        parent = parent.rpartition("/")[0]
        if parent in gone or parent in opaque:
            return True
    return False
