"""The reflink strategy on a loopback xfs image, and how explicit and ``auto`` choices fall back."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Env

from stickyci import disks
from stickyci.digest import Digest
from stickyci.disks import strategies
from stickyci.errors import StickyError
from stickyci.snapshot import load_manifest, restore, snapshot_tree
from stickyci.store import LocalBackend, ObjectStore

FICLONE = 0x40049409
FIEMAP_EXTENT_SHARED = 0x2000
MiB = 1 << 20


def can_reflink(directory: Path) -> bool:
    src, dst = directory / ".probe-src", directory / ".probe-dst"
    src.write_bytes(b"x" * 4096)
    try:
        with open(src, "rb") as s, open(dst, "wb") as d:
            fcntl.ioctl(d.fileno(), FICLONE, s.fileno())
        return True
    except OSError:
        return False
    finally:
        src.unlink()
        dst.unlink(missing_ok=True)


@pytest.fixture
def xfs(tmp_path: Path) -> Iterator[Path]:
    """A mounted 600 MiB reflink-enabled xfs image in tmp_path (mark the test ``root``)."""
    if not shutil.which("mkfs.xfs"):
        pytest.skip("mkfs.xfs is not installed (xfsprogs)")
    img, mnt = tmp_path / "xfs.img", tmp_path / "xfs"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(600 * MiB)
    made = subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(img)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"mkfs.xfs failed: {made.stderr.strip()}")
    mounted = subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot loop-mount an xfs image here: {mounted.stderr.strip()}")
    try:
        yield mnt
    finally:
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
        for p in sorted((p for p in points if p.startswith(str(mnt))), reverse=True):
            subprocess.run(["umount", p], check=False)
        loops = subprocess.run(["losetup", "-j", str(img)], capture_output=True, text=True)
        for line in loops.stdout.splitlines():
            subprocess.run(["losetup", "-d", line.split(":", 1)[0]], check=False)


def on_xfs(env: Env, xfs: Path) -> Env:
    cache = xfs / "cache"
    return Env(env.root, env.store, cache, {**env.environ, "STICKYCI_CACHE_DIR": str(cache)})


def extent_flags(path: Path) -> list[int]:
    out = subprocess.run(["xfs_io", "-r", "-c", "fiemap -v", str(path)], capture_output=True,
                         text=True, check=True).stdout
    flags = []
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0].rstrip(":").isdigit() and "hole" not in line:
            flags.append(int(parts[-1], 16))
    return flags


def free_bytes(path: Path) -> int:
    os.sync()
    st = os.statvfs(path)
    return st.f_bfree * st.f_frsize


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.root
def test_reflink_mount_shares_extents_and_commits_incrementally(env: Env, xfs: Path) -> None:
    if not shutil.which("xfs_io"):
        pytest.skip("xfs_io is not installed (xfsprogs)")
    e = on_xfs(env, xfs)
    ws = xfs / "ws"
    fresh = e.json("disk", "mount", "big", str(ws), "--strategy", "reflink")
    assert fresh["strategy"] == "reflink" and fresh["fresh"]
    big = os.urandom(48 * MiB)
    (ws / "big.bin").write_bytes(big)
    (ws / "lib").mkdir()
    (ws / "lib" / "small.txt").write_text("small\n")
    first = e.json("disk", "commit", str(ws))
    assert first["generation"] == 1 and first["stored_bytes"] >= 48 * MiB

    before = free_bytes(xfs)
    m = e.json("disk", "mount", "big", str(ws), "--strategy", "reflink")
    assert m["strategy"] == "reflink" and m["base_cached"]
    used = before - free_bytes(xfs)
    assert used < 4 * MiB, f"a reflink mount of 48 MiB used {used} bytes"
    flags = extent_flags(ws / "big.bin")
    assert flags and all(f & FIEMAP_EXTENT_SHARED for f in flags), flags
    assert sha(ws / "big.bin") == hashlib.sha256(big).hexdigest()

    # copy-on-write: writing the clone leaves the base alone
    base = e.cache / "bases" / first["snapshot"] / "big.bin"
    assert sha(base) == hashlib.sha256(big).hexdigest()
    with open(ws / "big.bin", "r+b") as f:
        f.seek(20 * MiB)
        f.write(b"\xff" * 4096)
    (ws / "lib" / "new.txt").write_text("new\n")
    assert sha(base) == hashlib.sha256(big).hexdigest()
    expected = bytearray(big)
    expected[20 * MiB:20 * MiB + 4096] = b"\xff" * 4096

    second = e.json("disk", "commit", str(ws))
    assert second["generation"] == 2
    d = e.json("disk", "diff", "big")
    assert (d["added"], d["modified"], d["metadata"], d["removed"]) == (
        ["lib/new.txt"], ["big.bin"], ["lib"], [])
    assert second["stored_bytes"] < 4 * MiB, second  # only the chunks around the change
    third = e.json("disk", "mount", "big", str(ws), "--strategy", "reflink")
    assert third["generation"] == 2 and third["strategy"] == "reflink"
    assert sha(ws / "big.bin") == hashlib.sha256(expected).hexdigest()
    assert (ws / "lib" / "new.txt").read_text() == "new\n"
    assert (ws / "lib" / "small.txt").read_text() == "small\n"
    e.run("disk", "unmount", str(ws))
    # and a machine without the base cache rebuilds the same tree from the store
    env.run("disk", "mount", "big", str(env.root / "ws2"), "--strategy", "copy")
    assert sha(env.root / "ws2" / "big.bin") == hashlib.sha256(expected).hexdigest()
    env.run("disk", "unmount", str(env.root / "ws2"))


def test_explicit_reflink_where_unsupported_is_a_one_line_error(env: Env) -> None:
    env.cache.mkdir()
    if can_reflink(env.cache):
        pytest.skip("this temp filesystem supports reflinks")
    ws = env.root / "ws"
    env.run("disk", "mount", "k", str(ws), "--strategy", "copy")
    (ws / "f").write_text("x")
    env.run("disk", "commit", str(ws))
    proc = env.run("disk", "mount", "k", str(ws), "--strategy", "reflink", check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "reflink" in lines[0] and str(ws) in lines[0]
    assert list(ws.iterdir()) == []  # nothing half-cloned left behind
    not_mount = env.run("disk", "commit", str(ws), check=False)
    assert "is not a stickyci mount" in not_mount.stderr
    assert env.json("disk", "mount", "k", str(ws), "--strategy", "copy")["strategy"] == "copy"
    assert (ws / "f").read_text() == "x"
    env.run("disk", "unmount", str(ws))


class _NoOverlay:
    """overlay as it behaves without privileges: mount(2) fails with the given errno."""

    name = "overlay"
    unsupported = strategies.STRATEGIES["overlay"].unsupported

    def __init__(self, err: int) -> None:
        self.err = err
        self.calls = 0

    def mount(self, *args: object) -> None:
        self.calls += 1
        raise OSError(self.err, os.strerror(self.err))


def _base(tmp: Path) -> tuple[Path, ObjectStore, str]:
    """A snapshot of a small tree in a store, and its base materialised at tmp/base."""
    src = tmp / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(os.urandom(10_000))
    os.symlink("d/f", src / "l")
    store = ObjectStore(LocalBackend(tmp / "store"))
    snap, _ = snapshot_tree(store, str(src))
    base = tmp / "base"
    base.mkdir()
    restore(store, load_manifest(store, snap), str(base))
    return base, store, snap.hex


def _chain(tmp: Path, monkeypatch: pytest.MonkeyPatch, err: int) -> tuple[str, Path, _NoOverlay]:
    base, store, snap = _base(tmp)
    fake = _NoOverlay(err)
    monkeypatch.setitem(strategies.STRATEGIES, "overlay", fake)
    path, sdir = tmp / "ws", tmp / "sdir"
    path.mkdir()
    got = strategies.mount("auto", base, path, sdir,
                           lambda: load_manifest(store, Digest.parse(snap)))
    return got, path, fake


@pytest.mark.parametrize("err", [errno.EPERM, errno.ENODEV])
def test_auto_falls_back_to_copy_without_overlay_or_reflink(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    if can_reflink(tmp_path):
        pytest.skip("this temp filesystem supports reflinks")
    got, path, fake = _chain(tmp_path, monkeypatch, err)
    assert fake.calls == 1 and got == "copy"
    assert (path / "d" / "f").read_bytes() == (tmp_path / "src" / "d" / "f").read_bytes()
    assert os.readlink(path / "l") == "d/f"
    assert not (path / ".stickyci-probe").exists()
    assert not list((tmp_path).glob(".probe-*"))


@pytest.mark.root
def test_auto_picks_reflink_on_xfs_without_overlay(xfs: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    got, path, fake = _chain(xfs, monkeypatch, errno.EPERM)
    assert fake.calls == 1 and got == "reflink"
    assert (path / "d" / "f").read_bytes() == (xfs / "src" / "d" / "f").read_bytes()


def test_auto_does_not_hide_a_real_failure(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(StickyError, match=r"overlay mount of .* failed"):
        _chain(tmp_path, monkeypatch, errno.EIO)  # not "unsupported": reported, not skipped
    assert list((tmp_path / "ws").iterdir()) == []


def test_api_auto_mount_records_the_strategy_it_fell_back_to(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    env.cache.mkdir()
    if can_reflink(env.cache):
        pytest.skip("this temp filesystem supports reflinks")
    ws = env.root / "ws"
    env.run("disk", "mount", "k", str(ws), "--strategy", "copy")
    (ws / "f").write_text("x")
    env.run("disk", "commit", str(ws))
    monkeypatch.setitem(strategies.STRATEGIES, "overlay", _NoOverlay(errno.EPERM))
    r = disks.mount("k", ws, strategy="auto")
    assert r.strategy == "copy" and (ws / "f").read_text() == "x"
    (ws / "g").write_text("y")
    c = disks.commit(ws)  # the commit reads the record, and uses the copy strategy's scan
    assert c.committed and c.added == 1
