"""Faults: a killed committer, a full store, damaged and missing objects, unsafe manifests.

Each fault must leave the disk's ref where it was, never restore damaged bytes silently, and
be reported as one line with the documented exit code.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import (
    STRATEGIES,
    Env,
    MiB,
    elsewhere,
    is_mount_record,
    names,
    one_line_error,
    reap,
    start_commit,
    tree_digest,
    wait_for,
    write_big,
)

from stickyci.digest import Digest
from stickyci.disks import refs
from stickyci.disks.refs import DiskRef, Generation
from stickyci.errors import IntegrityError, UnsafePath
from stickyci.snapshot import Entry, Manifest, load_manifest, restore, save_manifest
from stickyci.snapshot.model import DIR, FILE, SYMLINK
from stickyci.store import LocalBackend, ObjectStore
from stickyci.store.objects import decode_index

# --- kill -9 in the middle of a commit ---------------------------------------------------------

def group(pgid: int) -> list[int]:
    """Live processes in process group ``pgid``."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(d))
    return out


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_kill_9_during_commit_leaves_ref_and_mount_and_gc_cleans_up(env: Env,
                                                                     strategy: str) -> None:
    ws = env.root / "ws"
    env.run("disk", "mount", "k", str(ws), "--strategy", strategy)
    (ws / "version").write_text("one")
    (ws / "keep.bin").write_bytes(os.urandom(300_000))
    first = env.json("disk", "commit", str(ws))
    assert first["generation"] == 1

    env.run("disk", "mount", "k", str(ws), "--strategy", strategy)
    gen1_tree = tree_digest(ws)
    (ws / "version").write_text("two")
    write_big(ws, 128)
    gen2_tree = tree_digest(ws)
    packs0, index0 = names(env.store, "packs"), names(env.store, "index")
    assert names(env.store, "tmp") == set()

    # the committer and any worker it started are killed at once, as a job timeout would
    proc = start_commit(env, ws)
    try:
        wait_for(lambda: proc.poll() is not None or bool(names(env.store, "tmp"))
                 or names(env.store, "packs") != packs0, "the commit to start writing packs",
                 interval=0.002)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        reap(proc)
    assert proc.returncode == -signal.SIGKILL, "the commit finished before it could be killed"
    wait_for(lambda: not group(proc.pid), "the killed commit's processes to go")
    left = (names(env.store, "tmp") | (names(env.store, "packs") - packs0)
            | (names(env.store, "index") - index0))
    assert left, "the killed commit wrote nothing to the store"

    # the ref did not move
    shown = env.json("disk", "show", "k")
    assert [g["gen"] for g in shown["generations"]] == [1]
    assert shown["generations"][0]["snapshot"] == first["snapshot"]
    # another mount, here and on a machine without the base cache, sees generation 1
    for e, where in ((env, "here"), (elsewhere(env, "cache2"), "there")):
        other = env.root / where
        m = e.json("disk", "mount", "k", str(other), "--strategy", "copy")
        assert m["generation"] == 1
        assert tree_digest(other) == gen1_tree
        e.run("disk", "unmount", str(other))

    # gc (grace 0) removes the partial pack, the temp files and any pack nobody references,
    # and keeps what generation 1 and the live mount use
    report = env.json("disk", "gc", "--grace", "0s")
    assert report["orphans_deleted"] + report["packs_deleted"] >= 1
    assert names(env.store, "tmp") == set()
    assert names(env.store, "packs") == packs0 and names(env.store, "index") == index0

    # the killed commit's mount is still there (the commit had put the tree out of reach to
    # read it: the next commit or unmount puts it back): retrying commits it all
    retried = env.json("disk", "commit", str(ws))
    assert retried["committed"] and retried["generation"] == 2 and retried["added"] == 33
    assert env.json("disk", "gc", "--grace", "0s")["packs_deleted"] == 0
    there = elsewhere(env, "cache3")
    there.run("disk", "mount", "k", str(ws), "--strategy", "copy")
    assert tree_digest(ws) == gen2_tree
    there.run("disk", "unmount", str(ws))


@pytest.mark.root
def test_kill_9_of_a_new_disks_first_commit_after_its_unmount_leaves_it_to_retry(
        env: Env) -> None:
    """A new disk's first overlay commit unmounts the overlay before it reads the tree;
    killed from then on, it leaves the tree in the upper dir, and the next commit mounts it
    again and commits it."""
    ws = env.root / "ws"
    env.run("disk", "mount", "k", str(ws), "--strategy", "overlay")
    (ws / "version").write_text("one")
    write_big(ws, 128)
    written = tree_digest(ws)
    proc = start_commit(env, ws)
    try:
        wait_for(lambda: proc.poll() is not None or not os.path.ismount(ws),
                 "the commit to unmount the overlay", interval=0.002)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        reap(proc)
    assert proc.returncode == -signal.SIGKILL, "the commit finished before it could be killed"
    assert env.json("disk", "ls") == []
    retried = env.json("disk", "commit", str(ws))
    assert retried["committed"] and retried["generation"] == 1
    there = elsewhere(env, "cache2")
    there.run("disk", "mount", "k", str(ws), "--strategy", "copy")
    assert tree_digest(ws) == written
    there.run("disk", "unmount", str(ws))


def test_kill_9_of_the_committer_alone_stops_all_writing(env: Env) -> None:
    """``kill -9`` of the committing process alone: any worker it forked dies with it, so
    nothing is published for a dead commit and no worker prints a traceback on its way out."""
    ws = env.root / "ws"
    env.run("disk", "mount", "k", str(ws), "--strategy", "copy")
    write_big(ws, 128)

    def published() -> tuple[set[str], set[str]]:
        return names(env.store, "packs"), names(env.store, "index")

    proc = start_commit(env, ws)
    try:
        wait_for(lambda: proc.poll() is not None or bool(names(env.store, "tmp"))
                 or bool(names(env.store, "packs")), "the commit to start writing packs",
                 interval=0.002)
        proc.send_signal(signal.SIGKILL)  # the committing process only, as `kill -9 PID`
        proc.wait(timeout=30)
        at_death = published()
        wait_for(lambda: not group(proc.pid), "the killed commit's workers to go")
    finally:
        _, err = reap(proc)
    assert proc.returncode == -signal.SIGKILL, "the commit finished before it could be killed"
    assert published() == at_death, "packs were published after the committer was killed"
    assert "Traceback" not in err


def test_a_worker_killed_alone_fails_the_commit_and_keeps_the_ref(env: Env) -> None:
    """One forked worker killed on its own, as the out-of-memory killer picks one: the commit
    fails with one line instead of waiting forever for the dead worker's task, the ref stays
    where it was, the mount keeps its tree, and the same commit then goes through."""
    ws = env.root / "ws"
    env.run("disk", "mount", "k", str(ws), "--strategy", "copy")
    (ws / "keep").write_text("one")
    first = env.json("disk", "commit", str(ws))
    env.run("disk", "mount", "k", str(ws), "--strategy", "copy")
    write_big(ws, 128)
    written = tree_digest(ws)

    proc = start_commit(env, ws)
    try:
        workers: list[int] = []

        def started() -> bool:
            workers[:] = [p for p in group(proc.pid) if p != proc.pid]
            return proc.poll() is not None or bool(workers)

        wait_for(started, "the commit to fork its workers", interval=0.002)
        assert workers, "the commit finished before it forked a worker"
        os.kill(workers[0], signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        _, err = reap(proc)
    assert proc.returncode == 1, err
    assert "worker process was killed" in err.strip() and len(err.strip().splitlines()) == 1
    assert [g["gen"] for g in env.json("disk", "show", "k")["generations"]] == [1]
    assert tree_digest(ws) == written
    retried = env.json("disk", "commit", str(ws))
    assert retried["generation"] == 2 and retried["snapshot"] != first["snapshot"]


# --- a full store ------------------------------------------------------------------------------

# 12 MiB is committed by the committing process itself, 80 MiB by forked workers
@pytest.mark.root
@pytest.mark.parametrize("mib", [12, 80])
def test_store_full_keeps_the_ref_and_the_mount(small_store: Env, mib: int) -> None:
    env = small_store
    ws = env.root / "ws"
    env.run("disk", "mount", "k", str(ws), "--strategy", "copy")
    keep = os.urandom(1 * MiB)
    (ws / "keep.bin").write_bytes(keep)
    first = env.json("disk", "commit", str(ws))
    assert first["generation"] == 1
    packs0, index0 = names(env.store, "packs"), names(env.store, "index")

    env.run("disk", "mount", "k", str(ws), "--strategy", "copy")
    write_big(ws, mib)  # more than the store has room for
    proc = env.run("disk", "commit", str(ws), check=False)
    assert proc.returncode == 7, proc.stderr
    assert "full" in one_line_error(proc)

    shown = env.json("disk", "show", "k")
    assert [(g["gen"], g["snapshot"]) for g in shown["generations"]] == [(1, first["snapshot"])]
    assert names(env.store, "tmp") == set()  # the failed write cleaned up after itself
    assert (names(env.store, "packs"), names(env.store, "index")) == (packs0, index0)
    there = elsewhere(env, "cache2")
    other = env.root / "other"
    there.run("disk", "mount", "k", str(other), "--strategy", "copy")
    assert (other / "keep.bin").read_bytes() == keep and not (other / "big").exists()
    there.run("disk", "unmount", str(other))

    # the mount is intact; once it fits, the same commit goes through
    assert sum(p.stat().st_size for p in (ws / "big").iterdir()) == mib * MiB
    shutil.rmtree(ws / "big")
    (ws / "small.bin").write_bytes(os.urandom(1000))
    retried = env.json("disk", "commit", str(ws))
    assert retried["generation"] == 2 and retried["added"] == 1


# --- damaged and missing objects ---------------------------------------------------------------

def _two_generations(env: Env) -> tuple[dict[str, bytes], str, bytes, set[str]]:
    """Disk k: generation 1 with a.bin, generation 2 adds b.bin in a pack of its own; disk
    ``other`` in another pack. Returns gen1's files, gen2's pack id, b.bin and gen1's packs."""
    ws = env.root / "ws"
    env.run("disk", "mount", "other", str(ws), "--strategy", "copy")
    (ws / "o.bin").write_bytes(os.urandom(20_000))
    env.run("disk", "commit", str(ws))
    env.run("disk", "mount", "k", str(ws), "--strategy", "copy")
    gen1 = {"a.bin": os.urandom(40_000), "a.txt": b"hello\n"}
    for n, data in gen1.items():
        (ws / n).write_bytes(data)
    env.run("disk", "commit", str(ws))
    packs1 = names(env.store, "packs")
    env.run("disk", "mount", "k", str(ws), "--strategy", "copy")
    b = os.urandom(40_000)  # incompressible, under the chunking minimum: one raw object
    (ws / "b.bin").write_bytes(b)
    assert env.json("disk", "commit", str(ws))["generation"] == 2
    (pack,) = names(env.store, "packs") - packs1
    return gen1, pack, b, packs1


def _locate(env: Env, pack: str, digest: Digest) -> tuple[int, int]:
    entries = decode_index(f"index/{pack}", (env.store / "index" / pack).read_bytes())
    (loc,) = [(off, ln) for d, off, ln in entries if d == digest]
    return loc


def _patch(path: Path, edit: Callable[[bytearray], None]) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    edit(data)
    path.write_bytes(bytes(data))
    os.chmod(path, 0o444)


def _check_nothing_restored(env: Env, there: Env, ws2: Path) -> None:
    assert not ws2.exists()  # the failed mount removed the directory it created
    assert not is_mount_record(there, ws2)
    bases = there.cache / "bases"
    left = [p.name for p in bases.iterdir() if p.is_dir()] if bases.is_dir() else []
    assert all(n == "empty" for n in left), left  # no partial or damaged base kept


def _restore_gen(env: Env, gen: int, into: Path) -> None:
    ref = refs.read_ref(LocalBackend(env.store), "k")
    assert ref is not None
    g = ref.generation(gen)
    assert g is not None
    store = ObjectStore(LocalBackend(env.store))
    into.mkdir()
    restore(store, load_manifest(store, g.snapshot), str(into))


@pytest.mark.parametrize("damage", ["flip-payload", "flip-header", "truncate"])
def test_corrupt_object_is_refused_and_named(env: Env, damage: str) -> None:
    gen1, pack, b, _ = _two_generations(env)
    digest = Digest.of(b)
    off, ln = _locate(env, pack, digest)
    pack_path = env.store / "packs" / pack
    named = {str(digest)}
    if damage == "flip-payload":
        _patch(pack_path, lambda d: d.__setitem__(off + ln // 2, d[off + ln // 2] ^ 0x01))
    elif damage == "flip-header":
        _patch(pack_path, lambda d: d.__setitem__(off, d[off] ^ 0xFF))
    else:
        _patch(pack_path, lambda d: d.__delitem__(slice(off + ln // 2, None)))
        # the gen2 manifest sits after b.bin in the same pack: either may be reported first
        entries = decode_index(f"index/{pack}", (env.store / "index" / pack).read_bytes())
        named |= {str(d) for d, o, n in entries if o + n > off + ln // 2}

    there, ws2 = elsewhere(env, "cache2"), env.root / "ws2"
    proc = there.run("disk", "mount", "k", str(ws2), check=False)
    assert proc.returncode == 4, proc.stderr
    line = one_line_error(proc)
    assert "corrupt" in line or "truncated" in line
    assert any(n in line for n in named), line
    _check_nothing_restored(env, there, ws2)

    # the API refuses as well, and the intact generation 1 still restores bit for bit
    with pytest.raises(IntegrityError):
        _restore_gen(env, 2, env.root / "api2")
    _restore_gen(env, 1, env.root / "api1")
    assert {p.name: p.read_bytes() for p in (env.root / "api1").iterdir()} == gen1
    # a disk whose objects live in another pack is unaffected
    there.run("disk", "mount", "other", str(ws2))
    assert (ws2 / "o.bin").stat().st_size == 20_000
    there.run("disk", "unmount", str(ws2))


@pytest.mark.parametrize("lost", ["pack", "index"])
def test_missing_object_is_a_clear_error(env: Env, lost: str) -> None:
    gen1, pack, _, _ = _two_generations(env)
    (env.store / ("packs" if lost == "pack" else "index") / pack).unlink()
    there, ws2 = elsewhere(env, "cache2"), env.root / "ws2"
    proc = there.run("disk", "mount", "k", str(ws2), check=False)
    assert proc.returncode == 3, proc.stderr
    line = one_line_error(proc)
    assert "missing" in line
    assert (f"packs/{pack}" in line) if lost == "pack" else ("blake3:" in line)
    _check_nothing_restored(env, there, ws2)
    _restore_gen(env, 1, env.root / "api1")
    assert {p.name: p.read_bytes() for p in (env.root / "api1").iterdir()} == gen1


# --- unsafe manifests --------------------------------------------------------------------------

T = 1_600_000_000_000_000_000


def _unsafe(case: str, outside: Path, store: ObjectStore) -> Manifest:
    payload = b"pwned\n"
    chunk = [store.put(payload).hex, len(payload)]

    def f(path: str) -> Entry:
        return Entry(path, FILE, 0o644, T, size=len(payload), chunks=[chunk])

    def d(path: str) -> Entry:
        return Entry(path, DIR, 0o755, T)

    def ln(path: str, target: str) -> Entry:
        return Entry(path, SYMLINK, 0o777, T, target=target)

    entries = {
        "absolute": [d("a"), f(str(outside / "abs"))],
        "dotdot": [d("a"), f("a/../../outside/dotdot")],
        "leading-dotdot": [f("../outside/lead")],
        "dotdot-dir": [d("a"), d("a/.."), f("a/../x")],
        "dot": [d("a"), f("a/./x")],
        "empty-part": [d("a"), f("a//x")],
        "through-symlink": [ln("link", str(outside)), f("link/evil")],
        "through-relative-symlink": [d("a"), ln("a/up", "../../outside"), f("a/up/evil")],
        "deep-through-symlink": [d("a"), ln("a/l", str(outside)), d("a/l/x"), f("a/l/x/evil")],
        "through-file": [f("plain"), f("plain/evil")],
        "orphan": [f("nodir/evil")],
    }[case]
    return Manifest({e.path: e for e in entries})


UNSAFE = ["absolute", "dotdot", "leading-dotdot", "dotdot-dir", "dot", "empty-part",
          "through-symlink", "through-relative-symlink", "deep-through-symlink", "through-file",
          "orphan"]


@pytest.mark.parametrize("case", UNSAFE)
def test_unsafe_manifest_is_refused_before_writing(tmp_path: Path, case: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "sandbox" / "target"
    root.mkdir(parents=True)
    store = ObjectStore(LocalBackend(tmp_path / "store"))
    m = _unsafe(case, outside, store)
    snap = save_manifest(store, m)
    with pytest.raises(UnsafePath):
        restore(store, m, str(root))
    # the same manifest read back from the store (as a mount would) is refused the same way
    fresh = ObjectStore(LocalBackend(tmp_path / "store"))
    with pytest.raises(UnsafePath):
        restore(fresh, load_manifest(fresh, snap), str(root))
    assert list(root.iterdir()) == []
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside", "sandbox", "store"]
    assert [p.name for p in (tmp_path / "sandbox").iterdir()] == ["target"]


@pytest.mark.parametrize("case", ["absolute", "dotdot", "through-symlink", "deep-through-symlink"])
def test_unsafe_snapshot_in_a_ref_fails_mount_with_exit_9(env: Env, case: str) -> None:
    outside = env.root / "outside"
    outside.mkdir()
    backend = LocalBackend(env.store)
    store = ObjectStore(backend)
    snap = save_manifest(store, _unsafe(case, outside, store))
    now = time.time()
    refs.update_ref(backend, "evil", lambda _: DiskRef("evil", now, now, [
        Generation(1, snap, now, 6, 1, 0, "attacker:1")]))

    ws = env.root / "ws"
    proc = env.run("disk", "mount", "evil", str(ws), check=False)
    assert proc.returncode == 9, proc.stderr
    assert "unsafe" in one_line_error(proc) or "refusing" in proc.stderr
    assert not ws.exists()  # the failed mount removed the directory it created
    assert list(outside.iterdir()) == []
    assert not is_mount_record(env, ws)
    # nothing was written next to the restore directory either (where '..' would land)
    bases = env.cache / "bases"
    assert [p.name for p in bases.iterdir()
            if not p.name.startswith(".") or p.name.startswith(".tmp")] == []
