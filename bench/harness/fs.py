"""Files, mounts and the page cache: what a benchmark cleans up and what it makes cold or warm."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from .proc import log, run


def sync_seconds() -> float:
    """How long ``sync`` takes: the write-back a tool left behind, for the ``+ sync`` column."""
    start = time.perf_counter()
    os.sync()
    return time.perf_counter() - start


def du_bytes(path: Path) -> int:
    """Apparent size of a tree (``du -sb``), what a store or archive occupies."""
    return int(run(["du", "-sb", str(path)]).stdout.split()[0])


def disk_use(path: Path) -> int:
    """Bytes allocated under ``path``, mounts inside it skipped (0 if it is not there)."""
    out = subprocess.run(["du", "-sx", "-B1", str(path)], capture_output=True, text=True,
                         check=False).stdout.split()
    return int(out[0]) if out else 0


def remove(path: Path) -> None:
    """Delete a file or tree if present; refuse to delete through a live mount."""
    if not os.path.lexists(path):
        return
    if path.is_dir() and not path.is_symlink():
        if mounts_under(path, include_self=True):
            raise RuntimeError(f"refusing to delete {path}: something is mounted inside it")
        shutil.rmtree(path)
    else:
        path.unlink()


def mounts_under(root: Path, *, include_self: bool = False) -> list[str]:
    """Mount points inside ``root``, deepest first."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    prefix = str(root).rstrip("/") + "/"
    return sorted((p for p in points
                   if p.startswith(prefix) or (include_self and p == str(root))), reverse=True)


def unmount_leftovers(root: Path) -> None:
    """Last resort for mounts a killed earlier run left behind (normal runs unmount via the API)."""
    for point in mounts_under(root):
        log(f"unmounting leftover mount {point}")
        subprocess.run(["umount", "-l", point], check=False)


def filesystem_of(path: Path) -> tuple[str, str]:
    """The type and source of the filesystem holding ``path`` (``?`` when unknown)."""
    out = subprocess.run(["findmnt", "-no", "FSTYPE,SOURCE", "-T", str(path)],
                         capture_output=True, text=True, check=False).stdout.split()
    return (out[0], out[1]) if len(out) == 2 else ("?", "?")


def no_journal(fstype: str, source: str) -> bool:
    """True for an ext4 filesystem mounted without a journal (jbd2 lists none for it)."""
    if fstype != "ext4":
        return False
    dev = os.path.basename(source)
    try:
        return not any(n.startswith(f"{dev}-") for n in os.listdir("/proc/fs/jbd2"))
    except FileNotFoundError:  # no journal is in use on this machine at all
        return True


def can_make_filesystems() -> bool:
    """True if ``fresh_filesystem`` can work here: root, ``mkfs.ext4`` and ``losetup``."""
    return os.geteuid() == 0 and all(shutil.which(t) for t in ("mkfs.ext4", "losetup"))


@contextlib.contextmanager
def fresh_filesystem(image: Path, size: int, *, journal: bool) -> Iterator[Path]:
    """A new, empty ext4 filesystem for one measurement, in the sparse file ``image`` on a loop
    device (direct I/O, so its pages are not cached twice), mounted at ``image`` + ``.d``;
    unmounted and deleted afterwards.

    Why: on ext4 without a journal, creating a file passes over every inode freed in the last
    60 s (``recently_deleted``), so on a shared work dir a restore's time depends on what the
    measurement before it deleted. On a new filesystem every tool starts alike."""
    mountpoint = image.with_name(image.name + ".d")
    try:
        run(["truncate", "-s", str(size), str(image)])
        run(["mkfs.ext4", "-q", "-F", "-m", "0", *([] if journal else ["-O", "^has_journal"]),
             "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard", str(image)])
        device = run(["losetup", "--find", "--show", "--direct-io=on",
                      str(image)]).stdout.decode().strip()
        try:
            mountpoint.mkdir(exist_ok=True)
            run(["mount", device, str(mountpoint)])
            try:
                yield mountpoint
            finally:
                unmount_leftovers(mountpoint)
                run(["umount", str(mountpoint)])
        finally:
            run(["losetup", "--detach", device])
            mountpoint.rmdir()
    finally:
        image.unlink(missing_ok=True)


@contextlib.contextmanager
def restore_root(run_dir: Path, size: int, *, fresh: bool) -> Iterator[Path]:
    """An empty directory for one measurement that creates a tree (a restore: its target,
    base cache, restic cache), removed afterwards: on a new filesystem of ``size`` bytes with
    ``run_dir``'s journal setting (``fresh_filesystem``), else in ``run_dir``."""
    if fresh:
        with fresh_filesystem(run_dir / "cold.img", size,
                              journal=not no_journal(*filesystem_of(run_dir))) as root:
            yield root
        return
    root = run_dir / "cold"
    remove(root)
    root.mkdir()
    try:
        yield root
    finally:
        remove(root)


def settle(cache: Path, since: float) -> float:
    """Wait for deletions stickyci left running in the background under ``cache`` (an overlay's
    upper dir goes to ``mounts/.trash`` and a detached ``rm`` deletes it), so they do not run
    into the next measurement. Returns about how long they ran after ``since`` (0: done)."""
    trash = cache / "mounts" / ".trash"
    if not (trash.is_dir() and any(trash.iterdir())):
        return 0.0
    deadline = time.perf_counter() + 600
    while trash.is_dir() and any(trash.iterdir()):
        if time.perf_counter() > deadline:
            log(f"WARNING: {trash} is still not empty after 10 minutes")
            break
        time.sleep(0.02)
    return time.perf_counter() - since


def drop_caches() -> bool:
    """Write back and drop the page cache, so the next read comes from the disk."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        log(f"cannot drop the page cache ({exc.strerror}); 'cold' figures are not cold")
        return False
    return True


def walk(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """``(relative path, lstat)`` for everything under ``root``: stickyci's own tree walk."""
    from stickyci.snapshot.scan import walk as tree_walk

    return tree_walk(str(root))


def read_tree(root: Path) -> None:
    """Read every file once, so a 'warm' measurement really starts with the data cached."""
    for rel, st in walk(root):
        if stat.S_ISREG(st.st_mode):
            fd = os.open(root / rel, os.O_RDONLY)
            try:
                while os.read(fd, 1 << 20):
                    pass
            finally:
                os.close(fd)
