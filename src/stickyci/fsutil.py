"""Filesystem helpers shared by the layers: removing trees that may hold read-only dirs."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import uuid
from pathlib import Path


def _open_up(path: str) -> None:
    # Snapshots may contain read-only directories; their entries cannot be unlinked as non-root.
    for root, dirs, _ in os.walk(path):
        for d in dirs:
            p = os.path.join(root, d)
            with contextlib.suppress(OSError):
                if not os.path.islink(p):
                    os.chmod(p, stat.S_IRWXU)


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
    with os.scandir(path) as it:
        for de in it:
            if de.is_dir(follow_symlinks=False):
                shutil.rmtree(de.path, ignore_errors=True)
            else:
                os.unlink(de.path)


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
    subprocess.Popen(["rm", "-rf", "--", str(doomed)], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)
