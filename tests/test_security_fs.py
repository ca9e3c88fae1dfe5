"""Attacks on the filesystem side of a disk: a process racing a commit, and a hostile manifest.

* A commit reads only what is inside the mount: a process swapping a directory of the mount
  for a symlink to a secret directory (``renameat2(RENAME_EXCHANGE)`` in a tight loop, from
  outside the mount so no holder is seen) never gets the secret stored.
* A restore plants no setuid/setgid bit and no foreign owner unless the mount trusts owners
  (``--trust-owners``), and a trusted base is never reused by an untrusted mount.
* Impossible metadata (a mode that is not permission bits, negative or absurd ids, times,
  sizes) is corrupt data: refused in one line, exit 4, before anything is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import IS_ROOT, STRATEGIES, Env, described, stored_objects

from stickyci import disks
from stickyci.digest import Digest
from stickyci.disks import refs
from stickyci.errors import BusyError
from stickyci.snapshot import FILE, scan_tree
from stickyci.store import LocalBackend, ObjectStore

# Swaps two names with renameat2(RENAME_EXCHANGE) as fast as it can, until killed.
RACER = r"""
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
a, b = (p.encode() for p in sys.argv[1:3])
AT_FDCWD, RENAME_EXCHANGE = -100, 2
print("ready", flush=True)
while True:
    libc.renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE)
"""
ROUNDS = 110  # per strategy: more than 200 racing commits in all
MIN_COMMITTED = 20
"""Commits that must land (not be refused) for a run to say anything; on a loaded machine the
racer wins more often, so the test races on until then (at most ``4 * ROUNDS`` rounds)."""


@pytest.fixture
def racer(tmp_path: Path) -> Iterator[Any]:
    """Start the swapping process on two paths; it is killed when the test ends."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(a: Path, b: Path) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-c", RACER, str(a), str(b)],
                                stdout=subprocess.PIPE, cwd=tmp_path)
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def paused(proc: subprocess.Popen[bytes]) -> Iterator[None]:
    """Stop ``proc`` (and wait until it is stopped) for the block; its lookups in a mount
    would make umount(2) fail with EBUSY."""
    os.kill(proc.pid, signal.SIGSTOP)
    os.waitpid(proc.pid, os.WUNTRACED)
    try:
        yield
    finally:
        os.kill(proc.pid, signal.SIGCONT)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_commit_never_stores_what_a_swapped_symlink_points_to(
        env: Env, tmp_path: Path, racer: Any, strategy: str) -> None:
    secret = f"secret {uuid.uuid4().hex}".encode()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_bytes(secret)
    (outside / "g").write_bytes(secret * 2)

    ws = tmp_path / "ws"
    disks.mount("k", ws, strategy=strategy)
    inside = {b"inside f\n", b"inside g\n", b"x" * 5000}
    (ws / "d").mkdir()
    (ws / "d" / "f").write_bytes(b"inside f\n")
    (ws / "d" / "g").write_bytes(b"inside g\n")
    (ws / "top").write_bytes(b"x" * 5000)
    os.symlink(outside, ws / "s")
    disks.commit(ws, mode="always")

    swapper = racer(ws / "d", ws / "s")
    snapshots: list[str] = []
    refused = rounds = 0
    while rounds < ROUNDS or (len(snapshots) < MIN_COMMITTED and rounds < 4 * ROUNDS):
        rounds += 1
        # Mounts race too (test_restore_never_writes_through_a_swapped_symlink); here every
        # mount succeeds so that every round races a commit.
        with paused(swapper):
            disks.mount("k", ws, strategy=strategy)
            if strategy == "overlay":
                renew(ws)
        try:
            r = disks.commit(ws, mode="always")
            snapshots.append(r.snapshot)
            if r.still_mounted:  # the racer's lookups kept the overlay busy (EBUSY)
                with paused(swapper):
                    disks.unmount(ws)
        except BusyError as exc:  # the tree changed under the walk: an error, never a leak
            assert "changed while stickyci was reading or writing" in str(exc)
            refused += 1
            with paused(swapper):
                disks.unmount(ws)

    store = ObjectStore(LocalBackend(env.store))
    kinds: set[tuple[str, str]] = set()
    for snap in snapshots:
        tree = described(store, Digest.parse(snap))
        assert {t[8] for t in tree.values() if t[0] == FILE} <= inside, \
            f"snapshot {snap} stored bytes from outside"
        kinds.add((tree["d"][0], tree["s"][0]))
    # not even stored unreferenced, alone or in a bundle
    assert not any(secret in obj for obj in stored_objects(env.store))
    # Nor did a mount or unmount write or delete anything through the symlink.
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == {"f": secret, "g": secret * 2}
    # The racer really raced: commits were refused, or saw the names in several arrangements
    # (as a walk reads one name at a time, sometimes each in another arrangement).
    assert len(snapshots) >= MIN_COMMITTED, (len(snapshots), refused)
    assert refused or len(kinds) > 1, kinds


def test_restore_never_writes_through_a_swapped_symlink(env: Env, tmp_path: Path,
                                                       racer: Any) -> None:
    """A clone is restored into the mount path, where another process may already be renaming
    things: the restore either completes inside it or stops with an error; it never creates,
    chmods or touches anything through a directory swapped for a symlink."""
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o700)
    (outside / "f").write_bytes(b"keep")
    os.utime(outside, ns=(10**18, 10**18))
    before = [(p.name, os.lstat(p)) for p in (outside, outside / "f")]

    ws = tmp_path / "ws"
    disks.mount("k", ws, strategy="copy")
    (ws / "d").mkdir(mode=0o755)
    (ws / "d" / "x").write_bytes(b"x")
    os.symlink(outside, ws / "s")
    os.utime(ws / "d", ns=(2 * 10**18, 2 * 10**18))
    disks.commit(ws)

    swapper = racer(ws / "d", ws / "s")
    refused = 0
    for _ in range(40):
        try:
            disks.mount("k", ws, strategy="copy")
        except BusyError as exc:
            assert "changed while stickyci was reading or writing" in str(exc)
            refused += 1
            continue
        with paused(swapper):
            disks.unmount(ws)
    after = [(p.name, os.lstat(p)) for p in (outside, outside / "f")]
    assert [(n, s.st_mode, s.st_mtime_ns, s.st_uid, s.st_ino) for n, s in after] == [
        (n, s.st_mode, s.st_mtime_ns, s.st_uid, s.st_ino) for n, s in before]
    assert sorted(p.name for p in outside.iterdir()) == ["f"]
    assert refused, "the racer never swapped during a restore"


def renew(ws: Path) -> None:
    """Replace ``d`` and ``s`` by copies that exist only in the overlay's upper layer.

    overlayfs refuses to rename a directory of the lower layer (EXDEV), so the racer can only
    swap entries created in this mount. While ``d`` and ``s`` are lower entries nothing swaps
    them; the new ones are written under other names and renamed into place last, so this
    never writes through a swapped name itself.
    """
    for name in ("d", "s"):
        p = ws / name
        if p.is_symlink():
            p.unlink()
        else:
            for child in p.iterdir():
                child.unlink()
            p.rmdir()
    (ws / "d.new").mkdir()
    (ws / "d.new" / "f").write_bytes(b"inside f\n")
    (ws / "d.new" / "g").write_bytes(b"inside g\n")
    os.symlink(ws.parent / "outside", ws / "s.new")
    os.rename(ws / "s.new", ws / "s")
    os.rename(ws / "d.new", ws / "d")


# --- hostile manifests --------------------------------------------------------------------

CONTENT = b"#!/bin/sh\necho owned\n"


def _row(path: str, kind: str, mode: Any, uid: Any = 0, gid: Any = 0, *, mtime: Any = 10**18,
         chunk: str = "", size: Any = None) -> list[Any]:
    chunks = [[chunk, len(CONTENT)]] if kind == "file" else []
    return [path, kind, mode, mtime, uid, gid,
            (len(CONTENT) if kind == "file" else 0) if size is None else size, chunks,
            "", 0]


def plant(env: Env, key: str, rows: list[list[Any]]) -> str:
    """Store a crafted manifest and make it ``key``'s latest generation, straight through the
    store as a writer with access to it would; return the snapshot id."""
    backend = LocalBackend(env.store)
    store = ObjectStore(backend)
    chunk = store.put(CONTENT).hex
    for row in rows:
        if row[1] == "file" and row[7] and not row[7][0][0]:
            row[7][0][0] = chunk
    # The standard json module writes any integer, as a hostile writer would.
    doc = {"format": 1, "entries": sorted(rows, key=lambda r: r[0])}
    snap = store.put(json.dumps(doc).encode())
    store.flush()
    now = time.time()
    gen = refs.Generation(1, snap, now, len(CONTENT), 1, 0, "attacker")
    refs.update_ref(backend, key, lambda _: refs.DiskRef(key, now, now, [gen]))
    return snap.hex


SETUID_TREE = [
    _row("suid", "file", 0o4755, 0, 0),
    _row("sgid", "file", 0o2755, 0, 0),
    _row("foreign", "file", 0o644, 4321, 4321),
    _row("shared", "dir", 0o3777, 1234, 1234),  # setgid + sticky
    _row("shared/both", "file", 0o6755, 1234, 1234),
]
WANT = {"suid": (0o4755, 0, 0), "sgid": (0o2755, 0, 0), "foreign": (0o644, 4321, 4321),
        "shared": (0o3777, 1234, 1234), "shared/both": (0o6755, 1234, 1234)}


def meta(root: Path) -> dict[str, tuple[int, int, int]]:
    return {p: (stat.S_IMODE(s.st_mode), s.st_uid, s.st_gid) for p in WANT
            for s in [os.lstat(root / p)]}


def untrusted() -> dict[str, tuple[int, int, int]]:
    me = (os.geteuid(), os.getegid())
    return {p: (mode & ~0o6000, *me) for p, (mode, _, _) in WANT.items()}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_restore_plants_no_setuid_or_foreign_owner(env: Env, tmp_path: Path,
                                                   strategy: str) -> None:
    snap = plant(env, "victim", [list(r) for r in SETUID_TREE])
    bases = env.cache / "bases"
    ws = tmp_path / "ws"
    # A cold copy mount restores straight into its path, and a tree whose snapshot has
    # setuid bits and others' files is never adopted as a base: copy leaves none here.
    cached = strategy != "copy"

    env.run("disk", "mount", "victim", str(ws), "--strategy", strategy)
    assert meta(ws) == untrusted()
    assert (ws / "suid").read_bytes() == CONTENT
    assert (bases / snap).exists() == cached
    if cached:
        assert meta(bases / snap) == untrusted()  # the shared base cache too
    # What the restore left off is not a change the user made: nothing to commit.
    assert env.json("disk", "commit", str(ws))["committed"] is False
    assert (bases / snap).exists() == cached
    if cached:
        assert meta(bases / snap) == untrusted()  # and the base stays that way

    if not IS_ROOT:
        return  # only root can give files to other owners
    env.run("disk", "mount", "victim", str(ws), "--strategy", strategy, "--trust-owners")
    assert meta(ws) == WANT
    if cached:
        assert meta(bases / f"{snap}.owners") == WANT
    assert env.json("disk", "commit", str(ws))["committed"] is False
    assert (bases / f"{snap}.owners").exists() == cached
    # A trusted base exists now; an untrusted mount must not pick it up.
    env.run("disk", "mount", "victim", str(ws), "--strategy", strategy)
    assert meta(ws) == untrusted()
    env.run("disk", "unmount", str(ws))
    assert (bases / snap).exists() == cached
    if cached:
        assert meta(bases / snap) == untrusted()


@pytest.mark.root  # only root gives files to other owners
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_trusted_mount_commits_an_owner_change_to_the_mounting_user(
        env: Env, tmp_path: Path, strategy: str) -> None:
    # Without --trust-owners, root:root on "shared" is what the restore wrote; with it, the
    # restore wrote 1234:1234, so root:root is the user's own change and must be committed.
    plant(env, "nix", [list(r) for r in SETUID_TREE])
    ws = tmp_path / "ws"
    env.run("disk", "mount", "nix", str(ws), "--strategy", strategy, "--trust-owners")
    os.chown(ws / "shared", 0, 0)
    os.chmod(ws / "shared", 0o1777)  # exactly what an untrusted restore would write
    assert env.json("disk", "commit", str(ws))["committed"] is True
    env.run("disk", "mount", "nix", str(ws), "--strategy", strategy, "--trust-owners")
    assert meta(ws)["shared"] == (0o1777, 0, 0)
    assert meta(ws)["foreign"] == WANT["foreign"]
    env.run("disk", "unmount", str(ws))


@pytest.mark.parametrize(("row", "named"), [
    (_row("f", "file", -1), "mode -1"),
    (_row("f", "file", 2**40), f"mode {2**40}"),
    (_row("f", "file", "x"), "mode 'x'"),
    (_row("f", "file", 0o10755), "mode"),  # a file-type bit, not a permission
    (_row("f", "file", True), "mode True"),
    (_row("f", "file", 0o755, -1, 0), "owner -1:0"),
    (_row("f", "file", 0o755, 0, 2**40), "owner"),
    (_row("f", "file", 0o755, mtime=10**40), "mtime"),
    (_row("f", "file", 0o755, mtime=1.5), "mtime"),
    (_row("f", "file", 0o755, size=-5), "size -5"),
    (_row("f", "fifo", 0o644), "unknown type 'fifo'"),
    (_row("f", "file", 0o644, chunk="zz"), "chunk reference"),
], ids=["mode-1", "mode2**40", "mode-str", "mode-filetype", "mode-bool", "uid-1", "gid2**40",
        "mtime-huge", "mtime-float", "size-neg", "kind", "chunk"])
def test_impossible_metadata_is_refused_before_anything_is_written(
        env: Env, tmp_path: Path, row: list[Any], named: str) -> None:
    snap = plant(env, "victim", [_row("ok", "file", 0o644), row])
    ws = tmp_path / "ws"
    proc = env.run("disk", "mount", "victim", str(ws), "--strategy", "copy", check=False)
    assert proc.returncode == 4, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert snap in lines[0] and "'f'" in lines[0] and named in lines[0], lines[0]
    assert not ws.exists() or not any(ws.iterdir())
    bases = env.cache / "bases"
    # No base, finished or half-written (its lock files may stay).
    left = [p.name for p in (bases.iterdir() if bases.is_dir() else [])
            if snap in p.name and not p.name.endswith((".lock", ".pin"))]
    assert left == []


def test_a_clone_changed_after_its_commit_scan_is_not_adopted_as_a_base(tmp_path: Path) -> None:
    """A committed clone becomes the new snapshot's base only if it is still the tree the
    commit read: a base that differs from its manifest would serve other bytes to every later
    mount of that snapshot on this machine."""
    root = tmp_path / "t"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_bytes(b"scanned")
    os.symlink("d", root / "s")
    scan = scan_tree(str(root))
    assert scan.unchanged(root)
    (root / "d" / "f").write_bytes(b"scanned")  # same bytes, but written again
    assert not scan.unchanged(root)
    scan = scan_tree(str(root))
    os.rename(root / "d", root / "e")
    os.rename(root / "e", root / "d")  # back where it was, but moved
    assert not scan.unchanged(root)
    scan = scan_tree(str(root))
    (root / "new").write_bytes(b"")
    assert not scan.unchanged(root)
