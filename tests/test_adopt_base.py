"""The committed tree becomes this machine's base of the new snapshot, so the next mount here is
warm; and an adopted base is exactly what a restore of its manifest writes, whatever a process
racing the commit does."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import Env

from stickyci.digest import Digest
from stickyci.disks import api, basecache, holders, mounts
from stickyci.disks.strategies import overlay
from stickyci.disks.strategies.overlay import apply_upper
from stickyci.snapshot import (
    FILE,
    Content,
    Manifest,
    fill_content,
    load_manifest,
    restore,
    scan_tree,
)
from stickyci.snapshot.build import SMALL_FILE
from stickyci.store import LocalBackend, ObjectStore

Tree = dict[str, tuple[object, ...]]


def exact(root: Path) -> Tree:
    """Every entry under ``root`` with all a base must match: kind, mode, mtime, owners, bytes
    or link target, and which paths are one inode (named by the group's first path)."""
    seen: dict[str, tuple[os.stat_result, object]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                what: object = ("symlink", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                what = "dir"
            else:
                with open(p, "rb") as f:
                    what = Digest.of(f.read()).hex
            seen[os.path.relpath(p, root)] = (st, what)
    groups: dict[int, str] = {}
    for rel in sorted(seen):
        st = seen[rel][0]
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            groups.setdefault(st.st_ino, rel)
    return {rel: (what, stat.S_IMODE(st.st_mode), st.st_mtime_ns, st.st_uid, st.st_gid,
                  groups.get(st.st_ino, "") if not stat.S_ISDIR(st.st_mode) else "")
            for rel, (st, what) in seen.items()}


def restored(env: Env, snapshot: str, into: Path) -> Tree:
    """What a mount on another machine gets: the snapshot restored from the store."""
    store = ObjectStore(LocalBackend(env.store))
    into.mkdir()
    restore(store, load_manifest(store, Digest.parse(snapshot)), str(into))
    return exact(into)


def base_of(env: Env, snapshot: str) -> Path:
    return env.cache / "bases" / snapshot


def build_first(ws: Path) -> None:
    (ws / "src" / "deep").mkdir(parents=True)
    (ws / "src" / "main.c").write_bytes(b"int main(void) { return 0; }\n")
    (ws / "src" / "deep" / "big.o").write_bytes(os.urandom(3 << 20))
    (ws / "tool").write_bytes(b"#!/bin/sh\n")
    os.chmod(ws / "tool", 0o4755)  # setuid: a restore without trusted owners drops it
    os.chown(ws / "tool", 12345, 12345)  # and it writes the file as the user restoring it
    (ws / "empty").write_bytes(b"")
    (ws / "secret").write_bytes(b"s")
    os.chmod(ws / "secret", 0o600)
    os.link(ws / "src" / "main.c", ws / "main-link.c")
    os.symlink("src/main.c", ws / "entry")
    (ws / "gone").mkdir()
    (ws / "gone" / "a").write_bytes(b"a")
    (ws / "becomes-file").mkdir()
    (ws / "becomes-file" / "x").write_bytes(b"x")
    (ws / "becomes-dir").write_bytes(b"y")
    os.chmod(ws / "src" / "deep", 0o700)


def change(ws: Path) -> None:
    with open(ws / "src" / "deep" / "big.o", "r+b") as f:
        f.seek(1 << 20)
        f.write(b"patched")
    os.chmod(ws / "secret", 0o640)
    os.unlink(ws / "empty")
    subprocess.run(["rm", "-rf", str(ws / "gone")], check=True)
    subprocess.run(["rm", "-rf", str(ws / "becomes-file")], check=True)
    (ws / "becomes-file").write_bytes(b"now a file")
    os.unlink(ws / "becomes-dir")
    (ws / "becomes-dir").mkdir()
    (ws / "becomes-dir" / "inside").write_bytes(b"z")
    os.symlink("../tool", ws / "src" / "tool-link")
    (ws / "src" / "new.h").write_bytes(b"#pragma once\n")
    os.chown(ws / "src" / "new.h", 12345, 12345)
    os.link(ws / "src" / "new.h", ws / "src" / "new-link.h")


@pytest.mark.root
def test_an_overlay_commit_leaves_the_new_snapshot_as_this_machines_base(env: Env) -> None:
    ws = env.root / "ws"
    env.run("disk", "mount", "k", str(ws), "--strategy", "overlay")
    build_first(ws)
    first = env.json("disk", "commit", str(ws))
    assert first["committed"]
    assert exact(base_of(env, first["snapshot"])) == restored(env, first["snapshot"],
                                                              env.root / "r1")
    mounted = env.json("disk", "mount", "k", str(ws), "--strategy", "overlay")
    assert mounted["base_cached"] and mounted["snapshot"] == first["snapshot"]

    change(ws)
    second = env.json("disk", "commit", str(ws))
    assert second["committed"] and second["modified"] and second["removed"]
    # The old base was patched into the new one, not copied: nothing else used it.
    assert not base_of(env, first["snapshot"]).exists()
    assert exact(base_of(env, second["snapshot"])) == restored(env, second["snapshot"],
                                                               env.root / "r2")
    mounted = env.json("disk", "mount", "k", str(ws), "--strategy", "overlay")
    assert mounted["base_cached"] and mounted["generation"] == 2
    assert (ws / "becomes-dir" / "inside").read_bytes() == b"z"


@pytest.mark.root
def test_a_base_another_mount_stands_on_is_left_as_it_is(env: Env) -> None:
    a, b = env.root / "a", env.root / "b"
    env.run("disk", "mount", "k", str(a), "--strategy", "overlay")
    build_first(a)
    first = env.json("disk", "commit", str(a))
    env.run("disk", "mount", "k", str(a), "--strategy", "overlay")
    env.run("disk", "mount", "k", str(b), "--strategy", "overlay")
    change(a)
    second = env.json("disk", "commit", str(a))
    assert second["committed"]
    # b's lower layer is untouched, and still the first snapshot exactly.
    assert exact(base_of(env, first["snapshot"])) == restored(env, first["snapshot"],
                                                              env.root / "r1")
    assert not base_of(env, second["snapshot"]).exists()
    assert (b / "gone" / "a").read_bytes() == b"a"
    assert not env.json("disk", "mount", "k", str(a), "--strategy", "overlay")["base_cached"]
    assert (a / "becomes-file").read_bytes() == b"now a file"


@pytest.mark.root
def test_a_trusted_overlay_base_keeps_owners_and_special_bits(env: Env) -> None:
    ws = env.root / "ws"
    env.run("disk", "mount", "nix", str(ws), "--strategy", "overlay", "--trust-owners")
    (ws / "store").mkdir()
    (ws / "store" / "daemon").write_bytes(b"\x7fELF")
    os.chown(ws / "store" / "daemon", 30001, 30000)
    os.chmod(ws / "store" / "daemon", 0o4755)
    first = env.json("disk", "commit", str(ws))
    base = env.cache / "bases" / f"{first['snapshot']}{basecache.OWNERS_SUFFIX}"
    st = os.lstat(base / "store" / "daemon")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (30001, 30000, 0o4755)
    assert not base_of(env, first["snapshot"]).exists()  # an untrusted mount never gets it
    mounted = env.json("disk", "mount", "nix", str(ws), "--strategy", "overlay",
                       "--trust-owners")
    assert mounted["base_cached"]


@pytest.mark.parametrize("forked", [False, True], ids=["in-process", "forked"])
@pytest.mark.parametrize("bundled", [True, False], ids=["bundled", "alone"])
def test_an_upper_file_changed_after_the_commit_read_it_is_not_adopted(
        env: Env, monkeypatch: pytest.MonkeyPatch, forked: bool, bundled: bool) -> None:
    """A process that still writes to the upper dir once the commit has read it (through a
    descriptor opened before the commit, or the overlay mounted in another namespace) must not
    get its bytes into the base, whether the adoption copies in this process or, for a large
    commit, in forked workers, and whether the files are small ones stored in a bundle (each
    checked against its slice of it) or objects of their own. The write is made by hand
    between the commit's read and the adoption, which no test can time for real."""
    if forked:
        monkeypatch.setattr(overlay, "PARALLEL_MIN_BYTES", 0)
    upper = env.root / "upper"
    upper.mkdir()
    size_each = 1 << 12 if bundled else SMALL_FILE + 1
    content = {f"f{i:02}": os.urandom(size_each) for i in range(40)}
    for name, data in content.items():
        (upper / name).write_bytes(data)
    os.link(upper / "f00", upper / "link")
    objects = ObjectStore(LocalBackend(env.store))
    new = scan_tree(str(upper)).manifest
    files = [e for e in new.entries.values() if e.kind == FILE]
    fill_content(objects, str(upper), files)
    for e in files:
        assert len(e.chunks[0]) == (3 if bundled else 2)
        e.link = -e.link  # a group of the upper dir's own, as the overlay numbers it
    snapshot = Digest.of(b"the new snapshot")
    size = sum(map(len, content.values()))

    def adopt() -> bool:
        return basecache.adopt_changes(None, snapshot, size, False, str(env.root / "ws"),
                                       lambda tree: apply_upper(tree, upper, Manifest(), new,
                                                                set(new.entries), False,
                                                                Content(objects)))

    with open(upper / "f27", "r+b") as f:
        f.write(b"slipped in")  # same size, other bytes
    assert not adopt()
    bases = env.cache / "bases"
    assert [p.name for p in bases.iterdir() if not p.name.endswith((".lock", ".pin"))] == []

    (upper / "f27").write_bytes(content["f27"])
    assert adopt()
    base = bases / snapshot.hex
    assert {p.name: p.read_bytes() for p in base.iterdir() if p.name != "link"} == content
    assert (base / "link").stat().st_ino == (base / "f00").stat().st_ino


def test_a_copy_mount_still_held_open_is_not_adopted(env: Env) -> None:
    """A clone moved into the base cache is dropped if a process still holds a file in it:
    that process could write after every check."""
    tree = env.root / "clone"
    tree.mkdir()
    data = b"committed bytes\n"
    content = Content(ObjectStore(LocalBackend(env.store)))  # whole objects: it reads none
    (tree / "f").write_bytes(data)
    scan = scan_tree(str(tree))
    for e in scan.todo:
        e.chunks = [[Digest.of(data).hex, len(data)]]
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; f = open(sys.argv[1], 'ab'); print(flush=True); "
         "sys.stdin.read()", str(tree / "f")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "\n"  # it is open
        snapshot = Digest.of(b"held")
        assert basecache.adopt(tree, snapshot, len(data), scan, content)  # moved away...
        assert not base_of(env, snapshot.hex).exists()  # ...and dropped
    finally:
        holder.communicate("")

    tree.mkdir()
    (tree / "f").write_bytes(data)
    scan = scan_tree(str(tree))
    for e in scan.todo:
        e.chunks = [[Digest.of(data).hex, len(data)]]
    snapshot = Digest.of(b"free")
    assert basecache.adopt(tree, snapshot, len(data), scan, content)
    assert (base_of(env, snapshot.hex) / "f").read_bytes() == data


def test_a_cold_copy_mount_writes_the_tree_once_and_keeps_it_if_unchanged(env: Env) -> None:
    """A copy mount whose base is not cached restores straight into its path (a base and a
    copy of it would write every byte twice); the tree becomes the base once a commit finds
    it unchanged, so the next mount here is warm."""
    ws = env.root / "ws"
    env.run("disk", "mount", "k", str(ws), "--strategy", "copy")
    (ws / "src").mkdir()
    (ws / "src" / "main.c").write_bytes(b"int main(void) { return 0; }\n")
    (ws / "lib.a").write_bytes(os.urandom(1 << 20))
    os.link(ws / "lib.a", ws / "lib-link.a")
    snap = env.json("disk", "commit", str(ws))["snapshot"]
    subprocess.run(["rm", "-rf", str(env.cache / "bases")], check=True)  # a machine new to it

    cold = env.json("disk", "mount", "k", str(ws), "--strategy", "copy")
    assert not cold["base_cached"] and not base_of(env, snap).exists()
    assert exact(ws) == restored(env, snap, env.root / "r1")
    assert env.json("disk", "commit", str(ws))["committed"] is False
    assert exact(base_of(env, snap)) == restored(env, snap, env.root / "r2")
    warm = env.json("disk", "mount", "k", str(ws), "--strategy", "copy")
    assert warm["base_cached"] and (ws / "src" / "main.c").read_bytes().startswith(b"int main")


def plain_tree(ws: Path) -> dict[str, int]:
    """A tree a restore writes as it is (no setuid bit, the user's own files); the ctime
    of each file, which a move keeps and a copy does not."""
    (ws / "src").mkdir()
    (ws / "src" / "main.c").write_bytes(b"int main(void) { return 0; }\n")
    (ws / "lib.a").write_bytes(os.urandom(1 << 20))
    os.link(ws / "lib.a", ws / "lib-link.a")
    os.symlink("src/main.c", ws / "entry")
    return {p: os.stat(ws / p).st_ctime_ns for p in ("src/main.c", "lib.a")}


@pytest.mark.root
def test_a_new_disks_first_overlay_commit_moves_its_tree_into_the_base_cache(env: Env) -> None:
    ws = env.root / "ws"
    env.run("disk", "mount", "fresh", str(ws), "--strategy", "overlay")
    written = plain_tree(ws)
    snap = env.json("disk", "commit", str(ws))["snapshot"]
    base = base_of(env, snap)
    assert exact(base) == restored(env, snap, env.root / "r")
    # Moved, not copied: the files are the very inodes the job wrote.
    assert {p: os.stat(base / p).st_ctime_ns for p in written} == written
    assert env.json("disk", "mount", "fresh", str(ws), "--strategy", "overlay")["base_cached"]


def mounted_with(env: Env, ws: Path, based: bool) -> None:
    """Mount a new disk's overlay at ``ws``, or (``based``) one with a snapshot already, so
    that the commit patches its base instead of moving a whole tree into place."""
    env.run("disk", "mount", "fresh", str(ws), "--strategy", "overlay")
    if based:
        (ws / "before").write_bytes(b"generation 1")
        env.run("disk", "commit", str(ws))
        env.run("disk", "mount", "fresh", str(ws), "--strategy", "overlay")


@pytest.mark.root
@pytest.mark.parametrize("based", [False, True], ids=["new-disk", "based"])
def test_an_overlay_still_mounted_in_another_namespace_is_copied_not_moved(
        env: Env, based: bool) -> None:
    """A process that unshared its mount namespace while the disk was mounted keeps a copy of
    the overlay after the commit unmounts it here, and can write through it: the committed
    files are copied into the base cache, and those writes never reach the base."""
    ws = env.root / "ws"
    mounted_with(env, ws, based)
    written = plain_tree(ws)
    other = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f'cd /; echo ready; read go; echo evil > "{ws}/src/main.c"; echo wrote; read end'],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout is not None and other.stdout.readline() == "ready\n"
        snap = env.json("disk", "commit", str(ws))["snapshot"]
        base = base_of(env, snap)
        if not based:  # a move keeps the ctimes (a move into a patched base sets them)
            assert {p: os.stat(base / p).st_ctime_ns for p in written} != written
        assert other.stdin is not None
        other.stdin.write("go\n")
        other.stdin.flush()
        assert other.stdout.readline() == "wrote\n"
        assert exact(base) == restored(env, snap, env.root / "r")
        assert (base / "src" / "main.c").read_bytes().startswith(b"int main")
    finally:
        other.communicate("end\n")


def upper_of(env: Env, ws: Path) -> Path:
    """The upper dir of the overlay mounted at ``ws``."""
    return env.cache / "mounts" / Digest.of(str(ws).encode()).hex[:24] / "upper"


# Waits for a line, then writes to src/main.c: through the file it opened at start
# (``fd``), or opened then from its cwd (``cwd``).
_WRITER = ("import sys; f = open('main.c', 'r+b') if sys.argv[1] == 'fd' else None; "
           "print(flush=True); sys.stdin.readline(); f = f or open('main.c', 'r+b'); "
           "f.write(b'evil'); f.flush()")


@pytest.mark.root
@pytest.mark.parametrize("based", [False, True], ids=["new-disk", "based"])
@pytest.mark.parametrize("hold", ["cwd", "fd"])
def test_a_process_in_the_upper_dir_keeps_the_tree_from_being_moved(
        env: Env, based: bool, hold: str) -> None:
    """A process in the overlay's upper dir itself, not the mount (its cwd there, or a file
    open there), could write into the tree after the commit read it: the files are copied
    into the base cache, and that process's writes never reach the base."""
    ws = env.root / "ws"
    mounted_with(env, ws, based)
    written = plain_tree(ws)
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, hold],
                              cwd=upper_of(env, ws) / "src", stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "\n"  # in place
        snap = env.json("disk", "commit", str(ws))["snapshot"]
        base = base_of(env, snap)
        if not based:
            assert {p: os.stat(base / p).st_ctime_ns for p in written} != written  # copied
        writer.communicate("go\n", timeout=60)  # fails where the upper dir is gone: no harm
        assert exact(base) == restored(env, snap, env.root / "r")
        assert (base / "src" / "main.c").read_bytes().startswith(b"int main")
    finally:
        writer.kill()
        writer.wait()


@pytest.mark.parametrize("strategy", ["overlay", "copy"])
def test_a_sealed_commit_that_fails_leaves_the_disk_mounted_as_it_was(env: Env,
                                                                      strategy: str) -> None:
    """A commit puts the tree out of reach before it reads it (a new disk's overlay is
    unmounted, a clone's tree moved aside); when the commit then fails (here: it raced
    another and was told to fail), the mount is as the job left it, and a retry commits it."""
    if strategy == "overlay" and os.geteuid() != 0:
        pytest.skip("overlay mounts need root")
    ws, other = env.root / "ws", env.root / "other"
    env.run("disk", "mount", "fresh", str(ws), "--strategy", strategy)
    env.run("disk", "mount", "fresh", str(other), "--strategy", strategy)
    plain_tree(ws)
    before = exact(ws)
    (other / "theirs").write_bytes(b"first")
    env.run("disk", "commit", str(other))
    failed = env.run("disk", "commit", str(ws), "--on-conflict", "fail", check=False)
    assert failed.returncode != 0 and "was committed since this mount" in failed.stderr
    assert os.path.ismount(ws) == (strategy == "overlay") and exact(ws) == before
    (ws / "more").write_bytes(b"still writable")
    retried = env.json("disk", "commit", str(ws))
    assert retried["generation"] == 2 and [g["gen"] for g in retried["raced_with"]] == [1]
    base = base_of(env, retried["snapshot"])
    assert exact(base) == restored(env, retried["snapshot"], env.root / "r")
    assert (base / "more").read_bytes() == b"still writable"


def test_a_clone_entered_as_its_commit_seals_it_is_read_in_place(env: Env) -> None:
    """A process that entered a copy mount after the commit's check for holders would keep
    its way into the tree the commit moves aside to read: the commit puts it back and reads
    it in place (then checked again, as before it is adopted). The process is started by
    hand before the seal, since no test can time it between the check and the move."""
    ws = env.root / "ws"
    env.run("disk", "mount", "fresh", str(ws), "--strategy", "copy")
    plain_tree(ws)
    before = exact(ws)
    holder = subprocess.Popen(["sleep", "infinity"], cwd=ws / "src")
    try:
        state = mounts.load(ws.resolve())
        assert api._seal(state, ws)[0] is None
        assert exact(ws) == before and not (state.dir / api.SEALED).exists()
        holder.kill()
        holder.wait()
        assert api._seal(state, ws)[0] is True
        assert list(ws.iterdir()) == [] and exact(state.dir / api.SEALED_TREE) == before
        assert api._unseal(state, ws) and exact(ws) == before
    finally:
        holder.kill()
        holder.wait()


def fds_on(dev: int) -> list[int]:
    """This process's fds of files on the filesystem ``dev``."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.stat(f"/proc/self/fd/{fd}").st_dev == dev:
                out.append(int(fd))
        except OSError:  # the fd listdir itself used
            continue
    return out


@pytest.mark.root
@pytest.mark.parametrize("child", [True, False], ids=["spawned", "no-cat-on-path"])
def test_an_unmounted_overlay_is_freed_by_a_child_process_and_by_the_wait(
        env: Env, child: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The commit's unmount leaves freeing the overlay (a dentry and an inode for every path
    the job looked at) to a child process: until ``start`` a detached clone of the mount,
    held here, keeps the overlay alive and out of every mount table; ``start`` hands it over
    (no fd of this process is left on it, or a worker forked later would hold it); after
    ``wait`` no process holds it. Where no child can be spawned, ``start`` frees it here."""
    if not child:
        monkeypatch.setenv("PATH", str(env.root / "nothing-here"))
    ws = env.root / "ws"
    mounted_with(env, ws, based=True)
    plain_tree(ws)
    exact(ws)  # looked at through the overlay, as a build does
    dev = os.stat(ws).st_dev
    held = overlay.detach(ws)
    try:
        assert not os.path.ismount(ws)
        assert fds_on(dev)
        held.start()
        assert fds_on(dev) == []
        if not child:
            assert holders.device_in_use(dev) is None
    finally:
        held.wait()
    assert holders.device_in_use(dev) is None


@pytest.mark.root
def test_an_overlay_a_process_holds_is_not_detached(env: Env) -> None:
    """A file held open on the mount makes the unmount fail (EBUSY: the commit then reads the
    tree in place); the clone taken before it is let go of, the mount stays."""
    ws = env.root / "ws"
    mounted_with(env, ws, based=True)
    dev = os.stat(ws).st_dev
    with open(ws / "before", "rb"):
        with pytest.raises(OSError) as failed:
            overlay.detach(ws)
        assert failed.value.errno == errno.EBUSY
        assert os.path.ismount(ws) and len(fds_on(dev)) == 1  # the file opened above


@pytest.mark.root
def test_an_overlay_commit_moves_its_changed_files_into_the_new_base(env: Env) -> None:
    """Once the overlay is unmounted and let go of, nothing can write to its upper dir: the
    files the commit read there are moved into the new base, not copied and hashed again."""
    ws = env.root / "ws"
    mounted_with(env, ws, based=True)
    plain_tree(ws)
    upper = upper_of(env, ws)
    inodes = {p: os.stat(upper / p).st_ino for p in ("src/main.c", "lib.a")}
    snap = env.json("disk", "commit", str(ws))["snapshot"]
    base = base_of(env, snap)
    assert {p: os.stat(base / p).st_ino for p in inodes} == inodes
    assert exact(base) == restored(env, snap, env.root / "r")
